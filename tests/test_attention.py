"""Splash attention (`attn_implementation="splash"`, TPU Pallas) against the XLA attention: the kernel itself in
Pallas' interpret mode on CPU (forward and gradients, padded and causal), the XLA path off TPU, and the compiled TPU
step (deviceless, through libtpu) holding the kernel and no materialised [T, T] scores."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bioclip_jax.errors import InputError
from bioclip_jax.models.clip import CLIP, init_inputs, init_params
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.layers import attention, splash_attention

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # the Pallas kernel in interpret mode: slow compiles
@pytest.mark.parametrize("length, causal", [(5, False), (7, True)])
def test_splash_kernel_matches_xla_attention(length, causal):
    """Token counts that are not multiples of the kernel's 128-lane blocks (ViT-L/14 has 257): the padding must be
    masked out of the softmax and cut from the output, and its gradients must not leak into the real tokens."""
    q, k, v, g = (jax.random.normal(key, (2, 2, length, 64), jnp.float32) for key in jax.random.split(
        jax.random.key(length), 4))

    def loss(fn):
        return lambda *qkv: jnp.sum(fn(*qkv) * g)

    xla = lambda *qkv: attention(*qkv, causal)  # noqa: E731
    splash = lambda *qkv: splash_attention(*qkv, causal, interpret=True)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=1e-5, rtol=1e-5)
    grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    grads_splash = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    for ours, reference in zip(grads_splash, grads_xla):
        np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.integration  # compiles two tiny CLIPs
def test_splash_off_tpu_is_the_xla_path():
    """A recipe that asks for splash still trains on CPU/GPU: the same model, through XLA's attention."""
    config = get_model_config("tiny")
    params = init_params(config)
    images, tokens = init_inputs(config)
    out = {impl: CLIP(config, attn_implementation=impl).apply({"params": params}, images, tokens)
           for impl in ("xla", "splash")}
    for ours, reference in zip(jax.tree_util.tree_leaves(out["splash"]), jax.tree_util.tree_leaves(out["xla"])):
        np.testing.assert_array_equal(ours, reference)


def test_unknown_attention_is_refused():
    config = get_model_config("tiny")
    with pytest.raises(InputError, match="attn_implementation='flash': expected one of 'xla', 'splash'"):
        CLIP(config, attn_implementation="flash").init(jax.random.key(0), *init_inputs(config))


COMPILE_FOR_TPU = """
from bioclip_jax.train import plan
from bioclip_jax.train.config import load_config
config = load_config("tests/configs/tiny_train.py", ["train.global_batch_size=64", "dtype=bfloat16",
                     "scan_layers=True", "train.fsdp=True", "remat=full", "attn_implementation={impl}"])
result = plan.plan(config, "v5e:2x2", quick=True)
print("fits", result.fits)
print("kernel", "tpu_custom_call" in result.hlo)
# [16 pairs per chip, 2 heads, 17 tokens, 17 tokens]: the image tower's attention scores, materialised
print("scores", "f32[16,2,17,17]" in result.hlo)
"""


@pytest.mark.integration  # compiles for a TPU slice in subprocesses
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[tpu-plan]'")
def test_tpu_step_runs_the_kernel_per_chip():
    """Under FSDP and scan the compiled step calls the kernel (one chip's rows each, through shard_map) and no
    longer holds the float32 score matrix that the XLA path does."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    seen = {}
    for impl in ("xla", "splash"):
        done = subprocess.run([sys.executable, "-c", COMPILE_FOR_TPU.format(impl=impl)], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        seen[impl] = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in
                          ("fits", "kernel", "scores"))
    assert seen["xla"] == {"fits": "True", "kernel": "False", "scores": "True"}
    assert seen["splash"] == {"fits": "True", "kernel": "True", "scores": "False"}
