"""Grain pipelines: augmentation semantics, determinism, exact resume (also through Orbax), per-step text types,
process slicing, and evaluation coverage across processes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.data import pipeline
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import MIXED_TEXT_TYPES, Taxon, text_type_for_step
from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.tokenizer import tokenize

MAGPIE = Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"],
                          "black-billed magpie")


def _jpeg(rng, h=48, w=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards, 61 records, 7 species (one without a common name)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    n = 0
    for s, count in enumerate([25, 20, 16]):
        with ShardWriter(folder / f"t-{s:05d}.array_record") as writer:
            for _ in range(count):
                taxon = Taxon.from_ranks(MAGPIE.ranks[:6] + (f"sp{n % 7}",), "" if n % 7 == 3 else f"bird {n % 7}")
                writer.write(Record(f"id{n}", _jpeg(rng), taxon, "test", label=f"class{n % 7}"))
                n += 1
    return folder


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def _train(shards, **kw):
    args = dict(global_batch_size=8, image_size=32, seed=3, process_index=0, process_count=1)
    return pipeline.train_dataset(shards, **{**args, **kw})


def test_random_resized_crop_box_follows_torchvision():
    import torch
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = pipeline.random_resized_crop_box(300, 200, rng, (0.9, 1.0), (3 / 4, 4 / 3))
        assert 0.9 * 60000 * 0.98 <= w * h <= 60000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        assert 0 <= left <= 300 - w and 0 <= top <= 200 - h
    # A strip no crop of that area and ratio fits in: the deterministic fallback, as torchvision's.
    strip = Image.new("RGB", (1000, 10))
    torch.manual_seed(0)
    top, left, h, w = transforms.RandomResizedCrop.get_params(strip, (0.9, 1.0), (3 / 4, 4 / 3))
    assert pipeline.random_resized_crop_box(1000, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == (left, top, w, h)


def test_resized_crop_is_torchvisions():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    ours = pipeline.resized_crop(image, (7, 11, 100, 70), 64)
    theirs = F.resized_crop(image, 11, 7, 70, 100, [64, 64], InterpolationMode.BICUBIC)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_deterministic_for_a_seed(shards):
    first, _ = _take(_train(shards), 4)
    again, _ = _take(_train(shards), 4)
    other, _ = _take(_train(shards, seed=4), 4)
    for a, b in zip(first, again):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["tokens"], b["tokens"])
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    assert first[0]["image"].dtype == np.uint8 and first[0]["image"].shape == (8, 32, 32, 3)
    assert first[0]["tokens"].shape == (8, 77)


@pytest.mark.parametrize("worker_count,prefetch", [(0, 2), (1, 2), (2, 3), (0, 1)])
def test_exact_resume_from_iterator_state(shards, worker_count, prefetch):
    uninterrupted, _ = _take(_train(shards), 12)  # crosses epoch boundaries (61 records)
    opts = dict(worker_count=worker_count, prefetch_batches=prefetch)
    head, it = _take(_train(shards, **opts), 5)
    state = it.get_state()
    assert state["worker_count"] == worker_count
    resumed = iter(_train(shards, **{**opts, "prefetch_batches": 1}))  # prefetch depth is not part of the state
    resumed.set_state(state)
    tail = [next(resumed) for _ in range(7)]
    for a, b in zip(uninterrupted, head + tail):  # the same stream whatever the workers and prefetch
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["tokens"], b["tokens"])


def test_resume_into_another_worker_count_is_a_clear_error(shards):
    _, it = _take(_train(shards, worker_count=1), 2)
    resumed = iter(_train(shards))
    with pytest.raises(ValueError, match="ran with 1 worker processes, this run has 0: .*--config.data.workers=1"):
        resumed.set_state(it.get_state())
    legacy = iter(_train(shards))  # a state saved before the worker count was recorded still restores
    legacy.set_state({"next_index": 3})
    assert np.array_equal(next(legacy)["image"], _take(_train(shards), 4)[0][3]["image"])


def _devices(kind, n, platform="tpu"):
    from types import SimpleNamespace

    return [SimpleNamespace(platform=platform, device_kind=kind)] * n


@pytest.mark.parametrize("cpus,devices,expected", [
    (2, _devices("cpu", 1, "cpu"), 0),  # this machine, CI: threads in the training process
    (64, _devices("cpu", 1, "cpu"), 0),  # CPU-only hosts need their cores for the step
    (2, _devices("Tesla T4", 1, "gpu"), 0),  # a 2-core GPU notebook: one process would not pay
    (112, _devices("TPU v5 lite", 4), 9),  # v5e host: ceil(2 * 4 * 640 / 600)
    (224, _devices("TPU v5 lite", 8), 18),  # v5litepod-8: one host, 8 chips
    (240, _devices("TPU v4", 4), 12),
    (208, _devices("TPU v5", 4), 20),
    (180, _devices("TPU v6 lite", 4), 40),
    (180, _devices("TPU v6 lite", 8), 80),
    (16, _devices("TPU v6 lite", 8), 8),  # capped at half the CPUs
])
def test_auto_worker_count(cpus, devices, expected):
    assert pipeline.auto_worker_count(cpus, devices) == expected


def test_auto_workers_on_this_cpu_host_are_threads(shards):
    assert pipeline.auto_worker_count() == 0
    first, it = _take(_train(shards, worker_count=pipeline.AUTO_WORKERS), 2)
    assert it.get_state()["worker_count"] == 0
    assert np.array_equal(first[1]["image"], _take(_train(shards), 2)[0][1]["image"])


def test_resume_through_orbax(shards, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    expected, _ = _take(_train(shards), 6)
    _, it = _take(_train(shards), 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    resumed = iter(_train(shards))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for a in expected[3:]:
        assert np.array_equal(a["image"], next(resumed)["image"])


def test_mixed_text_type_is_one_type_per_step(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "one-00000.array_record") as writer:
        for i in range(16):
            writer.write(Record(f"id{i}", _jpeg(rng), MAGPIE))
    batches, _ = _take(_train(tmp_path), 6)
    for step, batch in enumerate(batches):
        expected = tokenize(MAGPIE.text(text_type_for_step(step)))
        assert (batch["tokens"] == expected).all(), step
    assert len({text_type_for_step(s) for s in range(6)}) > 1
    per_sample, _ = _take(_train(tmp_path, text_type="mixed_per_sample"), 1)
    captions = {tuple(row) for row in per_sample[0]["tokens"]}
    assert 1 < len(captions) <= len(MIXED_TEXT_TYPES)
    fixed, _ = _take(_train(tmp_path, text_type="taxonTag"), 1)
    assert (fixed[0]["tokens"] == tokenize(MAGPIE.text("taxonTag"))).all()


def test_two_processes_see_the_same_global_batches(shards):
    single, _ = _take(_train(shards, global_batch_size=8), 4)
    hosts = [_take(_train(shards, global_batch_size=8, process_index=p, process_count=2), 4)[0] for p in range(2)]
    for step in range(4):
        assert hosts[0][step]["image"].shape[0] == 4
        for key in ("tokens", "image"):  # the same examples, with the same crops
            together = sorted(x.tobytes() for p in range(2) for x in hosts[p][step][key])
            assert together == sorted(x.tobytes() for x in single[step][key])


def test_bad_configurations_are_named(shards):
    with pytest.raises(ValueError, match="global batch size 9 is not divisible by the number of processes \\(2\\)"):
        _train(shards, global_batch_size=9, process_count=2)
    with pytest.raises(ValueError, match="text_type='species'"):
        _train(shards, text_type="species")
    with pytest.raises(FileNotFoundError, match="no .array_record shards"):
        _train(shards / "nowhere")
    with pytest.raises(ValueError, match="data.workers=-2: expected -1 \\(auto\\), 0 \\(threads\\)"):
        _train(shards, worker_count=-2)
    with pytest.raises(ValueError, match="data.prefetch_batches=0: expected at least 1"):
        _train(shards, prefetch_batches=0)


@pytest.mark.parametrize("process_count,batch_size", [(1, 16), (2, 16), (2, 7), (3, 5)])
def test_eval_covers_every_example_once(shards, process_count, batch_size):
    per_process = [list(pipeline.eval_batches(shards, batch_size=batch_size, preprocess=Preprocess(size=32),
                                              process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert len({len(b) for b in per_process}) == 1  # same number of batches on every process
    seen = np.concatenate([b["index"][b["mask"]] for batches in per_process for b in batches])
    assert sorted(seen.tolist()) == list(range(61))
    batch = per_process[0][0]
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (batch_size, 32, 32, 3)
    assert batch["label"][0].startswith("class") and batch["ranks"].shape == (batch_size, 7)
    assert all((b["index"][~b["mask"]] == -1).all() for batches in per_process for b in batches)


def test_eval_images_are_the_eval_transform(shards):
    from bioclip_jax.data.records import find_shards, read_records

    first = next(read_records(find_shards(shards)))
    batch = next(pipeline.eval_batches(shards, batch_size=4, preprocess=Preprocess(size=32), process_index=0,
                                       process_count=1))
    assert np.array_equal(batch["image"][0], Preprocess(size=32)(Image.open(io.BytesIO(first.image))))
