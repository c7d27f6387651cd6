"""Grain input pipelines (Dataset API): training (shuffled, augmented, endless) and evaluation (every example once).

Training, per process:
    source -> tag source index -> seeded shuffle -> repeat -> tag global position -> [process_index::process_count]
           -> decode (an unreadable record replaced and counted) + RandomResizedCrop (uint8) -> batch
           -> caption of the step's text type -> tokenize -> prefetch
The i-th host batch of every process belongs to global step i, and the global batch of step i is always the same set
of examples (positions i*G .. (i+1)*G-1 of the shuffled stream) whatever the number of processes: a run on 2 hosts
sees the same data as on 1. Images leave the pipeline as uint8 (4x less to move than float32) and are normalised on
the device (`bioclip_jax.train.device_batch.normalize_images`).

Replay (BioCLIP 2): `replay_dataset` is the same pipeline over a second source (its own seed, endless, captions from
the records' own `text`), and `MixedDataset` appends its rows to every host batch of the main stream, each stream
keeping its own iterator state.

Evaluation: resize + center crop exactly as open_clip (`Preprocess`), no shuffle, each process a strided slice, the
last batches padded and masked so that every process runs the same number of batches and every example counts once.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from bioclip_jax import hardware
from bioclip_jax.data import pair_sources, transforms
from bioclip_jax.data.records import RecordVersionError, Unreadable, decode_record, open_shards
from bioclip_jax.data.taxonomy import MIXED_TEXT_TYPES, TEXT_TYPES, Taxon, text_type_for_sample, text_type_for_step
from bioclip_jax.data.transforms import decode_image
from bioclip_jax.errors import InputError
from bioclip_jax.tokenizer import tokenize

# "mixed": one of BioCLIP's five types per global batch, from the step ("random": BioCLIP 2's name for the same draw);
# "mixed_per_sample": one per example; "text": the record's own caption (image-text pairs: a replay stream).
TEXT_TYPE_CHOICES = ("mixed", "random", "mixed_per_sample", "text") + TEXT_TYPES
PER_STEP_TEXT_TYPES = ("mixed", "random")
# The replay stream's shuffle and crops use seed + this, so that they are not the main stream's draws again.
REPLAY_SEED_OFFSET = 104_729
log = logging.getLogger(__name__)


def open_source(data: Any, *, image_column: str = "", caption_column: str = ""):
    """A random-access source from what `data` points at (a folder, a glob, a list of files; `pair_sources.classify`):
    ArrayRecord shards -> a ShardSource, every shard checked (InputError naming a missing, empty, truncated or foreign
    file) before any training starts; WebDataset tars or Parquet files of image-text pairs -> a TarPairSource or
    ParquetPairSource (image_column / caption_column: Parquet's, when not one of the usual names); a mix of kinds is
    an InputError. Anything else with __len__ and __getitem__ returning record bytes or decoded record dicts (e.g. a
    TFDS source) is used as given."""
    if isinstance(data, (str, os.PathLike)) or (isinstance(data, (list, tuple)) and data and
                                                 isinstance(data[0], (str, os.PathLike))):
        kind, paths = pair_sources.classify(data)
        if kind == pair_sources.SHARDS:
            return open_shards(paths)
        return pair_sources.open_pairs(kind, paths, image_column=image_column, caption_column=caption_column)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"expected shard paths or a random-access source, got {type(data).__name__}")
    return data


def _where(source, index: int) -> str:
    return source.where(index) if hasattr(source, "where") else f"record {index}"


def decode_example(source, index: int, element) -> tuple[dict, Image.Image]:
    """Source element `index` -> (record dict, decoded image). InputError naming the shard file and record for one
    that cannot be read or decoded (what the pipelines skip); RecordVersionError (never skipped) for a newer format."""
    if isinstance(element, Unreadable):
        raise InputError(element.message())
    where = _where(source, index)
    record = decode_record(element, where) if isinstance(element, bytes) else element
    return record, decode_image(record["image"], f"{where} (id {record['id']!r})")


# ----------------------------------------------------------------------------------------------------- augmentation
def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop.get_params: 10 tries of area x log-uniform aspect, then a
    center crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Crop (left, top, w, h), then resize to size x size with bicubic: torchvision's resized_crop on PIL images.
    (PIL's resize(box=...) would differ: its filter reads pixels across the crop edge.)"""
    left, top, w, h = box
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


MAX_REPLACEMENT_TRIES = 10


class TrainTransform(grain.transforms.Map):
    """(position, (index, record)) -> {"image": uint8 [S, S, 3] (RandomResizedCrop, bicubic), "ranks", "common",
    "position", "skipped": None or why the record at this position was replaced}.

    The crop's randomness comes from (seed, position in the global stream), not from Grain's per-process element
    index, so an example gets the same crop whatever the number of processes. A record that cannot be read or
    decoded is replaced by a record drawn from the source with (seed, position) too, so the global batch of a step
    stays the same set of examples whatever the number of processes, and a resumed run sees the same data."""

    def __init__(self, image_size: int, seed: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), source=None):
        self.image_size, self.seed, self.scale, self.ratio = image_size, seed, tuple(scale), tuple(ratio)
        self.source = source

    def map(self, element) -> dict:
        position, (index, record) = element
        skipped = None
        try:
            record, image = decode_example(self.source, index, record)
        except RecordVersionError:
            raise
        except InputError as e:
            skipped = str(e)
            record, image = self._replacement(position, skipped)
        rng = np.random.default_rng((self.seed, position))
        box = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        image = resized_crop(image, box, self.image_size)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return {"image": np.asarray(image, np.uint8), "ranks": tuple(record["ranks"]), "common": record["common"],
                "text": record.get("text", ""), "id": record.get("id", ""), "position": position,
                "pass": position // len(self.source), "skipped": skipped}

    def _replacement(self, position: int, failure: str) -> tuple[dict, Image.Image]:
        for attempt in range(1, MAX_REPLACEMENT_TRIES + 1):
            index = int(np.random.default_rng((self.seed, position, attempt)).integers(len(self.source)))
            try:
                return decode_example(self.source, index, self.source[index])
            except RecordVersionError:
                raise
            except InputError:
                continue
        raise InputError(f"{failure}; and {MAX_REPLACEMENT_TRIES} records drawn at random to replace it could not "
                         f"be read either: the training data looks broken")


class Captioner:
    """Host batch of examples -> image batch + tokens of the captions of the step's text type."""

    def __init__(self, text_type: str, seed: int, context_length: int = 77):
        if text_type not in TEXT_TYPE_CHOICES:
            raise InputError(f"text_type={text_type!r}: expected one of {TEXT_TYPE_CHOICES}")
        self.text_type, self.seed, self.context_length = text_type, seed, context_length

    def __call__(self, step: int, examples: Sequence[dict]) -> dict:
        if self.text_type == "text":
            return self._batch(examples, [self._own_caption(e) for e in examples])
        if self.text_type in PER_STEP_TEXT_TYPES:
            types = [text_type_for_step(step)] * len(examples)
        elif self.text_type == "mixed_per_sample":
            types = [text_type_for_sample(self.seed, e["position"], MIXED_TEXT_TYPES) for e in examples]
        else:
            types = [self.text_type] * len(examples)
        return self._batch(examples, [Taxon.from_ranks(e["ranks"], e["common"]).text(t)
                                      for e, t in zip(examples, types)])

    def _batch(self, examples: Sequence[dict], captions: list[str]) -> dict:
        skipped = [e["skipped"] for e in examples if e.get("skipped")]
        # "passes": completed passes over the source before this batch's last example (a replay stream cycles).
        return {"image": np.stack([e["image"] for e in examples]),
                "tokens": tokenize(captions, self.context_length),
                "skipped": len(skipped), "skipped_records": skipped,  # host-side counts (`SkippedRecords`)
                "passes": max(e.get("pass", 0) for e in examples)}

    @staticmethod
    def _own_caption(example: dict) -> str:
        if not example["text"]:
            raise InputError(f"record {example['id']!r} has no caption (its 'text' field is empty): text_type='text' "
                             "(a replay stream) trains image-text pairs on their own captions; write them with one")
        return example["text"]


# ---------------------------------------------------------------------------------------- input workers (TPU host)
AUTO_WORKERS = -1  # data.workers = -1: sized from this host's accelerators and CPUs (auto_worker_count)
IMAGES_PER_S_PER_WORKER = 600  # one worker process: decode + crop + resize 224 px JPEGs, tokenize (docs/performance.md)
WORKER_HEADROOM = 2  # photos larger than 224 px decode slower; a worker shares its core with the host's other work
READ_THREADS = 2  # without worker processes: batches made concurrently by threads of the training process


def auto_worker_count(cpu_count: int | None = None, devices: Sequence[Any] | None = None) -> int:
    """Worker processes that feed this host's accelerators B/16 at their rate (`hardware`), twice over, using at most
    half of the CPUs (the rest: the training process, the TPU runtime). 0 (threads in the training process) on a
    CPU-only host, or where fewer than 2 processes would fit (2-core machines)."""
    devices = jax.local_devices() if devices is None else devices
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not devices or devices[0].platform == "cpu":
        return 0
    # Unknown kinds (a TPU v3, a GPU not in the table) are sized as the fastest TPU.
    fastest_tpu = max(hardware.TPUS.values(), key=lambda a: a.b16_images_per_s)
    per_chip = (hardware.find(devices[0].device_kind) or fastest_tpu).b16_images_per_s
    needed = math.ceil(WORKER_HEADROOM * len(devices) * per_chip / IMAGES_PER_S_PER_WORKER)
    workers = min(needed, cpu_count // 2)
    return workers if workers >= 2 else 0


def train_dataset(data: Any, *, global_batch_size: int, image_size: int, seed: int = 0, text_type: str = "mixed",
                  scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), context_length: int = 77, num_epochs: int | None = None,
                  worker_count: int = 0, prefetch_batches: int = 2, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This process's share of each global batch: {"image": uint8 [B, S, S, 3], "tokens": int32 [B, L], "skipped":
    int, "skipped_records": [why]}, with B = global_batch_size / process_count. "skipped" counts the examples of this
    share that replace an unreadable record (see TrainTransform; `SkippedRecords` sums and bounds them).
    Deterministic for a seed; its iterator state checkpoints exactly.

    worker_count: Grain worker processes, each making whole batches (0: READ_THREADS threads in this process;
    AUTO_WORKERS (-1): `auto_worker_count()`). It is part of the iterator state: a checkpoint restores only into the
    same count (a clear error otherwise). prefetch_batches: host batches made ahead of the training step (with
    processes: split over them, at least one each)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise InputError(f"global batch size {global_batch_size} is not divisible by the number of processes "
                         f"({process_count})")
    if worker_count < AUTO_WORKERS:
        raise InputError(f"data.workers={worker_count}: expected -1 (auto), 0 (threads) or a number of processes")
    if prefetch_batches < 1:
        raise InputError(f"data.prefetch_batches={prefetch_batches}: expected at least 1")
    source = open_source(data)
    if len(source) == 0:
        raise InputError("the training data is empty")
    captioner = Captioner(text_type, seed, context_length)
    # The source index travels with each record (to name a bad one); shuffling permutes indices only, so this
    # changes neither the order nor the crops. (Grain's shuffle passes index + epoch * size down: hence the modulo.)
    size = len(source)
    ds = (grain.MapDataset.source(source).map_with_index(lambda index, record: (index % size, record))
          .seed(seed).shuffle().repeat(num_epochs)
          .map_with_index(lambda position, record: (position, record))[process_index::process_count]
          .map(TrainTransform(image_size, seed, scale, ratio, source))
          .batch(global_batch_size // process_count, drop_remainder=True, batch_fn=list)
          .map_with_index(captioner))
    workers = auto_worker_count() if worker_count == AUTO_WORKERS else worker_count
    log.info("training input: %d worker processes%s, %d batches prefetched", workers,
             " (data.workers=-1: auto)" if worker_count == AUTO_WORKERS else "", prefetch_batches)
    if workers:
        # Elements of `ds` are whole batches: each worker process makes every workers-th batch.
        iter_ds = _multiprocess(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
                                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(
                                    1, math.ceil(prefetch_batches / workers))))
    else:
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(READ_THREADS, prefetch_batches),
                                                       prefetch_buffer_size=prefetch_batches))
    return _WorkerCountChecked(iter_ds, workers)


def _multiprocess(iter_ds: grain.IterDataset, options: grain.MultiprocessingOptions) -> grain.IterDataset:
    from absl import flags

    # grain's mp_prefetch reads absl flags; in a library (no absl.app.run) they are unparsed: use their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return iter_ds.mp_prefetch(options)


class _WorkerCountChecked(grain.IterDataset):
    """Adds the worker count to the iterator state, so that restoring into another count is a clear error instead of
    Grain's KeyError/IndexError or, from 1 to 2 workers, a silently different data order. States saved without it
    (older checkpoints) restore as before."""

    def __init__(self, parent: grain.IterDataset, worker_count: int):
        super().__init__(parent)
        self.worker_count = worker_count

    def __iter__(self) -> grain.DatasetIterator:
        return _WorkerCountCheckedIterator(self._parent.__iter__(), self.worker_count)


class _WorkerCountCheckedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, worker_count: int):
        super().__init__(parent)
        self.worker_count = worker_count

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {"worker_count": self.worker_count, "pipeline": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        if REPLAY in state:
            raise InputError("the checkpointed data iterator mixed in a replay stream (replay.data), this run has "
                             "none: resume with the same replay settings, or start a new workdir")
        if "worker_count" not in state:
            self._parent.set_state(state)
            return
        if state["worker_count"] != self.worker_count:
            raise InputError(f"the checkpointed data iterator ran with {state['worker_count']} worker processes, this "
                             f"run has {self.worker_count}: exact resume needs the same number; pass "
                             f"--config.data.workers={state['worker_count']}")
        self._parent.set_state(state["pipeline"])


# ------------------------------------------------------------------------------------------------ replay (BioCLIP 2)
MAIN, REPLAY = "main", "replay"


def replay_dataset(data: Any, *, rows_per_batch: int, image_size: int, seed: int = 0, text_type: str = "text",
                   process_index: int | None = None, process_count: int | None = None, image_column: str = "",
                   caption_column: str = "", **options) -> grain.IterDataset:
    """This process's share of the replay rows of each global batch (BioCLIP 2: 10,240 LAION-2B pairs per step),
    as `train_dataset` makes them from a second source: shuffled with its own seed (seed + REPLAY_SEED_OFFSET),
    endless (a source that runs dry starts a new pass, as BioCLIP 2's loader does; each batch's "passes" counts the
    completed ones), and trained on the records' own captions (text_type "text") unless another type is given.
    `data`: ArrayRecord shards, WebDataset tars or Parquet files of image-text pairs (`open_source`)."""
    process_count = jax.process_count() if process_count is None else process_count
    if rows_per_batch <= 0 or rows_per_batch % process_count:
        raise InputError(f"replay.per_batch={rows_per_batch}: expected a positive multiple of the number of processes "
                         f"({process_count}), so that every process adds the same number of replay rows")
    source = open_source(data, image_column=image_column, caption_column=caption_column)
    return train_dataset(source, global_batch_size=rows_per_batch, image_size=image_size,
                         seed=seed + REPLAY_SEED_OFFSET, text_type=text_type, num_epochs=None,
                         process_index=process_index, process_count=process_count, **options)


class MixedDataset(grain.IterDataset):
    """The main stream's host batch followed by the replay stream's, step by step: {"image", "tokens" (main rows
    first, then `replay_rows` replay rows), "replay_rows", "replay_passes", "skipped", "skipped_records" (both
    streams)}. The iterator state holds each stream's own state, so both resume exactly."""

    def __init__(self, main: grain.IterDataset, replay: grain.IterDataset):
        super().__init__([main, replay])
        self.main, self.replay = main, replay

    def __iter__(self) -> grain.DatasetIterator:
        return _MixedIterator(self.main.__iter__(), self.replay.__iter__())


class _MixedIterator(grain.DatasetIterator):
    def __init__(self, main: grain.DatasetIterator, replay: grain.DatasetIterator):
        super().__init__([main, replay])
        self.main, self.replay = main, replay

    def __next__(self) -> dict:
        main, replay = next(self.main), next(self.replay)
        return {"image": np.concatenate([main["image"], replay["image"]]),
                "tokens": np.concatenate([main["tokens"], replay["tokens"]]),
                "replay_rows": len(replay["image"]), "replay_passes": replay["passes"],
                "skipped": main["skipped"] + replay["skipped"],
                "skipped_records": main["skipped_records"] + replay["skipped_records"]}

    def get_state(self) -> dict:
        return {MAIN: self.main.get_state(), REPLAY: self.replay.get_state()}

    def set_state(self, state: dict) -> None:
        if REPLAY not in state:
            raise InputError("the checkpointed data iterator has no replay stream, this run mixes one in "
                             "(replay.data): resume without replay, or start a new workdir")
        self.main.set_state(state[MAIN])
        self.replay.set_state(state[REPLAY])


class EvalTransform(grain.transforms.Map):
    """(index, record) -> the preprocessed example, or {"index", "failed": why} for a record that cannot be read or
    decoded (skipped and reported, as predict does; a newer record format still raises)."""

    def __init__(self, preprocess: transforms.Preprocess, source=None):
        self.preprocess, self.source = preprocess, source

    def map(self, element) -> dict:
        index, record = element
        try:
            record, image = decode_example(self.source, index, record)
        except RecordVersionError:
            raise
        except InputError as e:
            return {"index": index, "failed": str(e)}
        return {"image": self.preprocess(image), "index": index, "id": record["id"], "label": record.get("label", ""),
                "ranks": tuple(record["ranks"]), "common": record["common"]}


def eval_batches(data: Any, *, batch_size: int, preprocess: transforms.Preprocess, worker_count: int = 0,
                 process_index: int | None = None, process_count: int | None = None) -> Iterator[dict]:
    """This process's evaluation batches: {"image" float32 [B, S, S, 3], "mask" bool [B], "index" int [B] (position
    in the source, -1 for padding), "id", "label", "common" str [B], "ranks" str [B, 7], "failed": [why]}. Every
    process yields the same number of batches; over all processes, every example appears exactly once, with mask
    True, or in some batch's "failed" (records that cannot be read or decoded: masked out like padding)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = open_source(data)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
    ds = (grain.MapDataset.source(source).map_with_index(lambda i, r: (i, r))[process_index::process_count]
          .map(EvalTransform(preprocess, source)).batch(batch_size, batch_fn=list))
    iter_ds = ds.to_iter_dataset()
    if worker_count:
        iter_ds = _multiprocess(iter_ds, grain.MultiprocessingOptions(num_workers=worker_count))
    batches = iter(iter_ds)
    shape = (preprocess.size, preprocess.size, 3)
    for _ in range(num_batches):
        yield _pad_eval_batch(next(batches, []), batch_size, shape)


def _pad_eval_batch(examples: list[dict], batch_size: int, image_shape) -> dict:
    failed = [e["failed"] for e in examples if "failed" in e]
    examples = [e for e in examples if "failed" not in e]
    pad = batch_size - len(examples)
    images = [e["image"] for e in examples] + [np.zeros(image_shape, np.float32)] * pad
    strings = lambda key: np.array([e[key] for e in examples] + [""] * pad, dtype=object)
    return {"image": np.stack(images), "mask": np.arange(batch_size) < len(examples),
            "index": np.array([e["index"] for e in examples] + [-1] * pad, np.int64),
            "id": strings("id"), "label": strings("label"), "common": strings("common"),
            "ranks": np.array([list(e["ranks"]) for e in examples] + [[""] * 7] * pad, dtype=object).reshape(-1, 7),
            "failed": failed}
