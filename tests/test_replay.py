"""BioCLIP 2's replay: a second stream mixed into every batch (exact counts, per process, cycling, exact resume), the
`continual_proj` head and the two-head objective against BioCLIP 2's loss in torch, `text_type=random`, the export."""

from __future__ import annotations

import io
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from bioclip_jax.convert.state_dict import to_open_clip
from bioclip_jax.data import pipeline
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon, text_type_for_step
from bioclip_jax.errors import InputError
from bioclip_jax.models.clip import CLIP, add_continual_proj, init_params, l2_normalize, without_continual_proj
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.loss import continual_clip_loss
from bioclip_jax.tokenizer import tokenize
from bioclip_jax.train.config import load_config
from bioclip_jax.train.device_batch import interleave_replay

TESTS = Path(__file__).parent
TAXON = Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "pica"], "magpie")


def _write(folder: Path, count: int, text: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    with ShardWriter(folder / "s-00000.array_record") as writer:
        for n in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            writer.write(Record(f"{folder.name}{n}", buf.getvalue(), TAXON, text=f"a photo number {n}" if text else ""))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    return _write(root / "main", 40, text=False), _write(root / "laion", 10, text=True)


def _mixed(data, process_index=0, process_count=1, main_rows=8, replay_rows=4):
    main, laion = data
    options = dict(image_size=16, seed=5, process_index=process_index, process_count=process_count)
    return pipeline.MixedDataset(pipeline.train_dataset(main, global_batch_size=main_rows, **options),
                                 pipeline.replay_dataset(laion, rows_per_batch=replay_rows, **options))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_replay_rows_per_batch_with_one_and_two_processes(data):
    captions = {tuple(t): n for n, t in enumerate(tokenize([f"a photo number {n}" for n in range(10)]))}
    one = _take(iter(_mixed(data)), 5)
    two = [_take(iter(_mixed(data, p, 2)), 5) for p in range(2)]
    for step, batch in enumerate(one):
        assert batch["replay_rows"] == 4 and batch["image"].shape == (12, 16, 16, 3) and batch["tokens"].shape[0] == 12
        replay = [captions[tuple(t)] for t in batch["tokens"][8:]]  # replay rows train on their own captions
        assert all(tuple(t) not in captions for t in batch["tokens"][:8])
        # 10 replay records, 4 a step: the source runs dry in step 2 and cycles, counted in "replay_passes"
        assert batch["replay_passes"] == (step * 4 + 3) // 10
        halves = [two[p][step] for p in range(2)]
        assert [h["replay_rows"] for h in halves] == [2, 2]
        assert sorted(replay) == sorted(captions[tuple(t)] for h in halves for t in h["tokens"][4:])
        assert sorted(r.tobytes() for r in batch["image"]) == sorted(r.tobytes() for h in halves for r in h["image"])
    seen = [captions[tuple(t)] for b in one for t in b["tokens"][8:]]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # whole passes


def test_two_streams_resume_bitwise_from_the_iterator_state(data):
    iterator = iter(_mixed(data))
    _take(iterator, 3)
    state = iterator.get_state()
    assert set(state) == {"main", "replay"}  # each stream's own state
    expected = _take(iterator, 3)
    resumed = iter(_mixed(data))
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3)):
        assert a["image"].tobytes() == b["image"].tobytes() and a["tokens"].tobytes() == b["tokens"].tobytes()
    plain = iter(pipeline.train_dataset(data[0], global_batch_size=8, image_size=16, process_index=0, process_count=1))
    with pytest.raises(InputError, match="mixed in a replay stream"):
        plain.set_state(state)
    with pytest.raises(InputError, match="has no replay stream"):
        iter(_mixed(data)).set_state(plain.get_state())


def test_interleave_gives_every_device_its_replay_rows():
    batch = {"image": np.arange(12), "tokens": np.arange(12) * 10, "replay_rows": 4}
    out = interleave_replay(batch, shards=2)
    np.testing.assert_array_equal(out["image"], [0, 1, 2, 3, 8, 9, 4, 5, 6, 7, 10, 11])
    np.testing.assert_array_equal(out["tokens"], out["image"] * 10)


def _bioclip2_reference(image, continual, text, scale, ranks, replay_per_rank):
    """BioCLIP 2's loss in torch, as its fork computes it with --local-loss --gather-with-grad on `ranks` GPUs: each
    rank's batch is its TreeOfLife rows then its replay rows (train.py), ContinualLoss splits them (loss.py), each
    rank's ClipLoss sets its own rows against all ranks' gathered rows (labels offset by rank), total = the sum of
    both losses (train.py), and DDP averages the ranks' gradients. Gathering with grad, that is the gradient of the
    mean over ranks."""
    import torch
    import torch.nn.functional as F

    image, continual, text = (torch.tensor(np.asarray(x), requires_grad=True) for x in (image, continual, text))
    scale = torch.tensor(float(scale), requires_grad=True)
    per_rank = [slice(r * len(image) // ranks, (r + 1) * len(image) // ranks) for r in range(ranks)]

    def clip(features, texts):  # lists of per-rank rows
        all_features, all_texts = torch.cat(features), torch.cat(texts)
        losses = []
        for rank, (f, t) in enumerate(zip(features, texts)):
            labels = torch.arange(len(f)) + len(f) * rank
            losses.append((F.cross_entropy(scale * f @ all_texts.T, labels) +
                           F.cross_entropy(scale * t @ all_features.T, labels)) / 2)
        return losses

    n = replay_per_rank
    tol = clip([image[s][:-n] for s in per_rank], [text[s][:-n] for s in per_rank])
    replay = clip([continual[s][-n:] for s in per_rank], [text[s][-n:] for s in per_rank])
    total = sum(a + b for a, b in zip(tol, replay)) / ranks
    total.backward()
    return (total.item(), sum(tol).item() / ranks, sum(replay).item() / ranks,
            [x.grad.numpy() for x in (image, continual, text, scale)])


@pytest.mark.parametrize("ranks", [1, 2])
def test_two_head_loss_and_gradients_match_bioclip2s(ranks):
    rng = np.random.default_rng(ranks)
    features = [l2_normalize(jnp.asarray(rng.normal(size=(12 * ranks, 8)), jnp.float32)) for _ in range(3)]
    scale = jnp.float32(7.5)

    def loss(image, continual, text, scale):
        return continual_clip_loss(image, continual, text, scale, shards=ranks, replay_per_shard=4)

    (total, parts), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*features, scale)
    ref_total, ref_tol, ref_replay, ref_grads = _bioclip2_reference(*features, scale, ranks, 4)
    np.testing.assert_allclose([total, parts["contrastive_loss"], parts["continual_loss"]],
                               [ref_total, ref_tol, ref_replay], rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_continual_head_is_bioclip2s_and_export_loads_in_open_clip():
    import open_clip
    import torch

    from tests.conftest import TINY_OPEN_CLIP_CFG

    config = get_model_config("tiny")
    params = init_params(config, seed=1, continual_proj=True)
    started = add_continual_proj(without_continual_proj(params))["visual"]  # BioCLIP 2 starts it as a copy of proj
    assert started["continual_proj"] is started["proj"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, config.vision.image_size, config.vision.image_size, 3)), jnp.float32)
    tokens = jnp.asarray(tokenize(["a", "b", "c"], config.text.context_length))
    image, _, _, continual = jax.jit(CLIP(config, continual_proj=True).apply)({"params": params}, images, tokens)

    state_dict = to_open_clip(params, config)
    assert "visual.continual_proj" not in state_dict  # as BioCLIP 2's release: open_clip loads it strictly
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_image(pixels, normalize=True).numpy(), image, atol=1e-5)
        # BioCLIP 2's fork: continual_pooled = pooled @ continual_proj, on the pooled token `proj` reads
        model.visual.proj.copy_(torch.from_numpy(np.asarray(params["visual"]["continual_proj"])))
        np.testing.assert_allclose(model.encode_image(pixels, normalize=True).numpy(), continual, atol=1e-5)
    flat = traverse_util.flatten_dict(params, sep="/")
    assert flat["visual/continual_proj"].shape == flat["visual/proj"].shape


def test_text_type_random_is_bioclip2s_draw():
    for step in range(3000):  # BioCLIP 2's train.py: random.seed(step); random.choice([sci, com, ...])
        random.seed(step)
        assert text_type_for_step(step) == random.choice(["sci", "com", "taxon", "sci_com", "taxon_com"])
    examples = [{"image": np.zeros((2, 2, 3), np.uint8), "ranks": TAXON.ranks, "common": "magpie", "position": 0}]
    for step in (0, 1, 7):
        random_tokens = pipeline.Captioner("random", seed=0)(step, examples)["tokens"]
        np.testing.assert_array_equal(random_tokens, pipeline.Captioner("mixed", seed=0)(step, examples)["tokens"])


def test_bad_replay_settings_are_one_clear_line(data):
    from bioclip_jax.train import trainer

    with pytest.raises(InputError, match="replay.per_batch=3: expected a positive multiple of the number of proc"):
        pipeline.replay_dataset(data[1], rows_per_batch=3, image_size=16, process_index=0, process_count=2)
    untitled = iter(pipeline.replay_dataset(data[0], rows_per_batch=2, image_size=16, process_index=0,
                                            process_count=1))
    with pytest.raises(InputError, match="has no caption"):
        next(untitled)
    config = load_config(TESTS / "configs" / "tiny_train.py", [f"data.train={data[0]}", "replay.per_batch=4"])
    with pytest.raises(InputError, match="replay.per_batch=4 needs replay.data"):
        trainer._data_iterator(config, get_model_config("tiny"))
    mesh = jax.make_mesh((1,), ("data",))
    config = load_config(TESTS / "configs" / "tiny_train.py", ["replay.per_batch=4", "train.accum_steps=3"])
    with pytest.raises(InputError, match="accum_steps=3 with replay: each device's 16 main and 4 replay rows"):
        trainer._replay_layout(config, mesh)
    assert trainer.device_batch_size(config) == 20


def test_accumulation_with_replay_matches_the_whole_batch(shards=2):
    """BioCLIP 2's recipe fits a v5p chip in two micro-batches: the loss, its two parts and the update must be those
    of the whole batch (each micro-batch keeps every device's main-then-replay layout)."""
    import optax

    from bioclip_jax.train.trainer import make_train_step

    config = get_model_config("tiny")
    params = init_params(config, seed=2, continual_proj=True)
    rng = np.random.default_rng(shards)
    size, rows = config.vision.image_size, 12 * shards  # per device: 8 main rows, then 4 replay rows
    batch = {"image": jnp.asarray(rng.integers(0, 256, (rows, size, size, 3)), jnp.uint8),
             "tokens": jnp.asarray(rng.integers(1, 400, (rows, config.text.context_length)), jnp.int32)}
    tx, schedule = optax.apply_if_finite(optax.sgd(1.0), 10), lambda step: 1.0  # the update is the gradient
    outs = []
    for accum in (1, 4):  # 4: one replay row per device and micro-batch
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        step = jax.jit(make_train_step(CLIP(config, continual_proj=True), tx, schedule, "openai", accum,
                                       replay=(shards, 4)))
        outs.append(step(state, batch))
    for new_state, metrics in outs[1:]:
        for key in ("loss", "contrastive_loss", "continual_loss"):
            np.testing.assert_allclose(metrics[key], outs[0][1][key], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(new_state["params"]),
                        jax.tree_util.tree_leaves(outs[0][0]["params"])):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.integration  # trains tiny runs end to end
def test_training_with_replay_resumes_bitwise_and_logs_both_losses(data, tmp_path):
    from bioclip_jax.train.trainer import train

    def config():
        return load_config(TESTS / "configs" / "tiny_train.py", [
            f"data.train={data[0]}", f"replay.data={data[1]}", f"replay.per_batch={2 * jax.device_count()}",
            "train.steps=4", "data.text_type=random"])

    straight = train(config(), tmp_path / "straight", progress=False)
    assert {"contrastive_loss", "continual_loss", "data/replay_passes"} <= set(straight.history[-1])
    for h in straight.history:  # the logged loss is the sum of the two, as BioCLIP 2's total_loss
        assert h["loss"] == pytest.approx(h["contrastive_loss"] + h["continual_loss"], rel=1e-6)
    train(config(), tmp_path / "split", max_steps=2, progress=False)
    train(config(), tmp_path / "split", progress=False)
    checkpoints = {}
    for run in ("straight", "split"):
        from bioclip_jax.convert import run_dir

        with run_dir.Checkpoints(tmp_path / run, read_only=True) as saved:
            checkpoints[run] = traverse_util.flatten_dict(saved.restore_params(4), sep="/")
    assert "visual/continual_proj" in checkpoints["straight"]
    for key, value in checkpoints["straight"].items():
        assert value.tobytes() == checkpoints["split"][key].tobytes(), key
    assert "continual_proj" not in straight.model().params["visual"]  # inference and export use `proj`
