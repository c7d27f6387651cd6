"""Scan over layers: the scanned towers compute what the per-layer ones do, on the same weights; the converter speaks
open_clip's per-layer names in both layouts; remat applies inside the scan; a scanned training run loads and resumes
like any other."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CAPTIONS
from flax import traverse_util
from test_train import CONFIG, _config, _params, shards  # noqa: F401 - shards is a fixture

import bioclip_jax
from bioclip_jax.convert import state_dict as sd
from bioclip_jax.models import CLIP
from bioclip_jax.models.layers import REMAT_POLICIES
from bioclip_jax.models.scan import is_stacked, stack_layers, unstack_layers
from bioclip_jax.train.optimizer import decay_mask
from bioclip_jax.train.trainer import train

TINY = bioclip_jax.get_model_config("tiny")


@pytest.fixture(scope="module")
def inputs():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64, 64, 3)), jnp.float32)
    tokens = jnp.asarray(bioclip_jax.tokenize(CAPTIONS[:3]))
    return images, tokens


def _encode(params, images, tokens, scan_layers: bool, **options):
    module = CLIP(TINY, scan_layers=scan_layers, **options)
    return (module.apply({"params": params}, images, method="encode_image"),
            module.apply({"params": params}, tokens, method="encode_text"))


def test_stacked_layout(tiny_open_clip):
    _, state_dict = tiny_open_clip
    per_layer = sd.from_open_clip(state_dict, TINY)
    stacked = sd.from_open_clip(state_dict, TINY, scan_layers=True)
    assert is_stacked(stacked) and not is_stacked(per_layer)
    blocks = stacked["visual"]["transformer"]
    assert list(blocks) == ["resblocks"] and blocks["resblocks"]["attn"]["in_proj"]["kernel"].shape == (2, 64, 192)
    np.testing.assert_array_equal(blocks["resblocks"]["mlp"]["c_fc"]["kernel"][1],
                                  per_layer["visual"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])
    # The shapes a scanned model creates are exactly the stacked converter output's.
    flat = traverse_util.flatten_dict(stacked)
    assert sd.param_shapes(TINY, scan_layers=True) == {p: v.shape for p, v in flat.items()}
    # Stacking and unstacking are exact inverses, and each is a no-op on its own output layout.
    for a, b in zip(jax.tree_util.tree_leaves(unstack_layers(stacked)), jax.tree_util.tree_leaves(per_layer)):
        assert a.tobytes() == b.tobytes()
    assert stack_layers(stacked) == stacked and unstack_layers(per_layer) == per_layer


def test_scanned_forward_equals_per_layer_and_open_clip(tiny_open_clip, inputs):
    torch_model, state_dict = tiny_open_clip
    images, tokens = inputs
    plain = _encode(sd.from_open_clip(state_dict, TINY), images, tokens, scan_layers=False)
    scanned = _encode(sd.from_open_clip(state_dict, TINY, scan_layers=True), images, tokens, scan_layers=True)
    with torch.no_grad():
        reference = (torch_model.encode_image(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())),
                     torch_model.encode_text(torch.from_numpy(np.asarray(tokens, np.int64))))
    for a, b, ref in zip(plain, scanned, reference):  # image tower, then text tower
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b), ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("on_device", [False, True])
def test_round_trip_from_stacked_is_bit_exact(tiny_open_clip, on_device):
    _, state_dict = tiny_open_clip
    stacked = sd.from_open_clip(state_dict, TINY, scan_layers=True)
    if on_device:  # as a trainer hands them over: jax arrays
        stacked = jax.tree_util.tree_map(jnp.asarray, stacked)
    back = sd.to_open_clip(stacked, TINY)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_scanned_init_matches_per_layer_init_in_distribution(inputs):
    images, tokens = inputs
    plain = traverse_util.flatten_dict(CLIP(TINY).init(jax.random.key(0), images[:1], tokens[:1])["params"])
    scanned = CLIP(TINY, scan_layers=True).init(jax.random.key(0), images[:1], tokens[:1])["params"]
    assert jax.tree_util.tree_structure(unstack_layers(scanned)) == jax.tree_util.tree_structure(
        traverse_util.unflatten_dict(plain))
    for path, value in traverse_util.flatten_dict(unstack_layers(scanned)).items():
        reference, name = plain[path], "/".join(path)
        if not any(p.startswith("resblocks_") for p in path) or path[-1] == "bias" or path[-2].startswith("ln"):
            np.testing.assert_array_equal(value, reference, err_msg=name)  # same key outside the blocks; 0s and 1s
        else:
            np.testing.assert_allclose(np.std(value), np.std(reference), rtol=0.1, err_msg=name)
            assert abs(np.mean(value)) < 0.1 * np.std(value), name
    layers = scanned["visual"]["transformer"]["resblocks"]["attn"]["out_proj"]["kernel"]
    assert not np.allclose(layers[0], layers[1])  # every layer has its own random key


def _loss(params, images, tokens, **options):
    image, text, scale = CLIP(TINY, **options).apply({"params": params}, images, tokens)
    logits = scale * image @ text.T
    labels = jnp.arange(len(logits))
    return -(jax.nn.log_softmax(logits)[labels, labels].mean() + jax.nn.log_softmax(logits.T)[labels, labels].mean())


def _primitives_in_scans(jaxpr, inside: bool = False) -> set[str]:
    """Names of the primitives that run inside a scan body, searched through nested jaxprs (jit, remat, ...)."""
    found = set()
    for eqn in jaxpr.eqns:
        if inside:
            found.add(eqn.primitive.name)
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                found |= _primitives_in_scans(sub, inside or eqn.primitive.name == "scan")
    return found


@pytest.fixture(scope="module")
def per_layer_grads(tiny_open_clip, inputs):
    """Loss and gradients of the per-layer model without remat: the reference every scanned variant must give."""
    images, tokens = inputs
    params = sd.from_open_clip(tiny_open_clip[1], TINY)
    return params, jax.jit(jax.value_and_grad(lambda p: _loss(p, images, tokens)))(params)


@pytest.mark.integration  # a gradient compile per remat policy
@pytest.mark.parametrize("policy", [None, *sorted(REMAT_POLICIES)])
def test_remat_inside_scan_keeps_loss_and_grads(per_layer_grads, inputs, policy):
    """nn.remat of the block, then nn.scan: the gradient's scan bodies hold the rematerialised forward (and a scan
    without remat does not), and loss and gradients are the per-layer model's."""
    images, tokens = inputs
    per_layer, (loss, grads) = per_layer_grads
    grad_fn = jax.value_and_grad(lambda p: _loss(p, images, tokens, scan_layers=True, remat=policy))
    stacked = stack_layers(per_layer)
    assert ("remat2" in _primitives_in_scans(jax.make_jaxpr(grad_fn)(stacked).jaxpr)) == (policy is not None)
    scan_loss, scan_grads = jax.jit(grad_fn)(stacked)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    flat, scan_flat = (traverse_util.flatten_dict(g) for g in (grads, unstack_layers(scan_grads)))
    assert flat.keys() == scan_flat.keys()
    for path in flat:  # float32 sums in another order: 1e-5 of the largest gradient entry of each tensor
        scale = max(float(np.abs(flat[path]).max()), 1e-3)
        np.testing.assert_allclose(scan_flat[path], flat[path], atol=1e-5 * scale, err_msg="/".join(path))


def test_decay_mask_is_per_layer_for_stacked_params(tiny_open_clip):
    _, state_dict = tiny_open_clip
    per_layer = traverse_util.flatten_dict(decay_mask(sd.from_open_clip(state_dict, TINY)))
    stacked = traverse_util.flatten_dict(decay_mask(sd.from_open_clip(state_dict, TINY, scan_layers=True)))
    for path, decays in stacked.items():
        for layer in range(TINY.vision.layers):
            same = tuple(f"resblocks_{layer}" if p == "resblocks" else p for p in path)
            assert decays == per_layer[same], path
    # per tower 4 stacked kernels (in/out proj, c_fc, c_proj); conv1, both positional embeddings, proj, text_projection,
    # token_embedding
    assert sum(stacked.values()) == 2 * 4 + 6


def _embeddings(model):
    return bioclip_jax.encode(model, images=list(np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), np.uint8)),
                              texts=CAPTIONS[:3])


@pytest.mark.integration  # trains and resumes tiny runs
def test_scanned_training_run_loads_per_layer(shards, tmp_path):  # noqa: F811 - shards is a fixture
    result = train(_config(shards, "scan_layers=True", "train.steps=4", f"data.val={shards}", "eval.every_steps=2"),
                   tmp_path / "run", progress=False)
    assert is_stacked(result.params)  # the trainer holds (and checkpoints) the stacked layout
    from_result = result.model()
    loaded = bioclip_jax.load(tmp_path / "run")
    assert not is_stacked(from_result.params) and not is_stacked(loaded.params)
    for a, b in zip(_embeddings(from_result), _embeddings(loaded)):
        np.testing.assert_array_equal(a, b)
    # and the per-layer params export to open_clip's names
    assert sd.to_open_clip(loaded.params, loaded.config).keys() == sd.expected_state_dict_shapes(TINY).keys()


@pytest.mark.integration  # trains and resumes tiny runs
def test_scanned_resume_is_bitwise_exact(shards, tmp_path):  # noqa: F811 - shards is a fixture
    train(_config(shards, "scan_layers=True"), tmp_path / "straight", progress=False)
    first = train(_config(shards, "scan_layers=True"), tmp_path / "split", max_steps=3, progress=False)
    assert first.step == 3
    second = train(_config(shards, "scan_layers=True"), tmp_path / "split", progress=False)
    assert second.step == 6 and second.history[0]["step"] == 4
    straight, split = _params(tmp_path / "straight"), _params(tmp_path / "split")
    assert straight.keys() == split.keys() and "visual/transformer/resblocks_1/ln_1/scale" in straight
    for key in straight:
        assert straight[key].tobytes() == split[key].tobytes(), key


@pytest.mark.integration  # trains and resumes tiny runs
def test_scanned_training_starts_from_per_layer_weights(tiny_open_clip, tmp_path):
    """config.init (open_clip weights, per layer) feeds a scanned trainer: the initial params are the same tensors,
    stacked."""
    from test_train import CONFIG

    from bioclip_jax.convert.files import write_open_clip_folder
    from bioclip_jax.train.config import load_config
    from bioclip_jax.train.trainer import _initial_params

    _, state_dict = tiny_open_clip
    folder = write_open_clip_folder(tmp_path / "init", state_dict, TINY, {}, write_bin=False)
    config = load_config(CONFIG, ["scan_layers=True", f"init={folder}"])
    params = _initial_params(config, TINY, seed=0)()
    assert is_stacked(params)
    back = sd.to_open_clip(params, TINY)
    for key, value in state_dict.items():
        assert back[key].tobytes() == value.tobytes(), key


FSDP_STEPS = """
import jax, numpy as np
from flax import traverse_util
from bioclip_jax.models.clip import init_params
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.scan import stack_layers, unstack_layers
from bioclip_jax import mesh as mesh_lib
from bioclip_jax.train import trainer
from bioclip_jax.train.config import load_config

model = get_model_config("tiny")
params = init_params(model, 0)
rng = np.random.default_rng(0)
size = model.vision.image_size
batch = {"image": rng.integers(0, 256, (16, size, size, 3)).astype(np.uint8),
         "tokens": rng.integers(1, 400, (16, model.text.context_length)).astype(np.int32)}
result = {}
for scan, fsdp in ((False, False), (True, True)):
    config = load_config(CONFIG, [f"scan_layers={scan}", f"train.fsdp={fsdp}"])
    parts = trainer.build_train_step(config, model, mesh_lib.make_mesh(),
                                     lambda: stack_layers(params) if scan else params)
    state = jax.jit(parts.init_state, out_shardings=parts.state_sharding)()
    for _ in range(3):
        state, _ = parts.step(state, jax.device_put(batch, parts.batch_sharding))
    result[scan] = traverse_util.flatten_dict(unstack_layers(jax.device_get(state["params"])), sep="/")
worst = max(float(np.max(np.abs(result[True][k] - result[False][k]))) for k in result[False])
print("max difference", worst)
assert worst < 1e-4, worst
"""


@pytest.mark.integration  # a subprocess with 8 devices
def test_scanned_fsdp_steps_equal_per_layer_data_parallel_on_8_devices():
    """FSDP under scan gathers each layer inside the loop and reduce-scatters its gradient there (bioclip_jax/mesh.py's
    layer_gather); three steps on 8 devices land where per-layer data parallel does."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", f"CONFIG = {str(CONFIG)!r}\n" + FSDP_STEPS], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
