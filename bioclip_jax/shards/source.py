"""What make-shards asks of a source (TreeOfLife webdataset tars, TreeOfLife-10M as published, a metadata.csv folder,
the synthetic tree of life): check its inputs (`settings`), plan the samples of every split in a fixed order (`plan`),
then read the samples of some planned shards as raw `Example`s (`read`), in any worker process."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Iterator

from bioclip_jax.shards.build import Example, Skip
from bioclip_jax.shards.output import Shard


@dataclasses.dataclass
class Plan:
    """Every split's samples in output order, as groups of items (`len`-able and sliceable; a shard never spans two
    groups), the samples skipped while planning ({split: [{name, reason, detail}]}), input-level errors, and
    `extra` sections for OUT/summary.json. `scratch`: files the plan needs until the shards are written."""
    groups: dict[str, list]
    skipped: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    input_errors: list[dict] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    scratch: list[str] = dataclasses.field(default_factory=list)
    whole_groups: bool = False  # each group is one shard, whatever its length (the source cut the shards itself)


class Source(abc.ABC):
    """One kind of input. A source is pickled into every job: keep what only planning needs out of its attributes."""

    name: str  # Record.source of its records and the summaries' "source"
    records_per_shard: int = 10000  # make_shards' defaults for this source
    workers: int | None = None  # None: default_workers()
    val_fraction: float | None = None  # in the manifest when the source splits by id

    @abc.abstractmethod
    def settings(self) -> dict:
        """Checks the inputs (raising before anything is written) -> what identifies them in the manifest."""

    @abc.abstractmethod
    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        """The samples of every split, in the order they will be written."""

    @abc.abstractmethod
    def read(self, shards: list[Shard]) -> Iterator[tuple[int, str, Example | Skip]]:
        """The samples of these shards (one job) -> (index in `shards`, the sample's name in summaries, the example or
        why it cannot be one), each shard's samples in plan order."""

    def jobs(self, shards: list[Shard]) -> list[list[Shard]]:
        """The unfinished shards cut into jobs (each one worker's): by default a job per shard."""
        return [[shard] for shard in shards]

    def notes(self, summary: dict) -> list[str]:
        """Lines on the source's own summary sections (`Plan.extra`) for the report."""
        return []


class ItemSource(Source):
    """A source whose items can be read one at a time, in any order."""

    @abc.abstractmethod
    def load(self, item, files: dict) -> Example:
        """One planned item -> its example, or raises Skip. `files` caches the job's open files (closed after it)."""

    @abc.abstractmethod
    def name_of(self, item) -> str:
        """How a skipped item is named in summaries."""

    def read(self, shards: list[Shard]) -> Iterator[tuple[int, str, Example | Skip]]:
        files: dict = {}
        try:
            for k, shard in enumerate(shards):
                for item in shard.items:
                    try:
                        example: Example | Skip = self.load(item, files)
                    except Skip as s:
                        example = s
                    yield k, self.name_of(item), example
        finally:
            for f in files.values():
                f.close()


def read_at(files: dict, path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of `path`; `files` caches open files (one shard reads many members of a tar)."""
    if path not in files:
        files[path] = open(path, "rb")
    f = files[path]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise Skip("truncated member", f"{len(data)} of {size} bytes")
    return data


def is_val(seed: int, example_id: str, fraction: float) -> bool:
    """Deterministic train/val assignment from (seed, id): stable across runs, machines and Python versions (the
    built-in hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_by_id(items: list, ids: list[str], seed: int, val_fraction: float) -> Plan:
    """Items -> a plan of train and val (one group each) by `is_val`. A repeated id goes the way of its first
    occurrence and is skipped, so ids stay unique within the output."""
    plan: dict[str, list] = {"train": [], "val": []}
    skipped: dict[str, list] = {"train": [], "val": []}
    seen: set[str] = set()
    for item, example_id in zip(items, ids):
        split = "val" if is_val(seed, example_id, val_fraction) else "train"
        if example_id in seen:
            skipped[split].append({"name": example_id, "reason": "duplicate id", "detail": ""})
            continue
        seen.add(example_id)
        plan[split].append(item)
    return Plan({split: [items] for split, items in plan.items()}, skipped)
