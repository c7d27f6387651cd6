"""make-shards: a source's raw samples -> ArrayRecord shards of records, one per image (JPEG bytes). Format and
layout are documented in docs/data_format.md.

    summary = make_shards(TreeOfLifeTars("data/shard-{000000..000003}.tar"), "shards/tol", resize=224)
    print(summary.report())

Every run first makes a plan: each split's samples in a fixed order (inputs in the order given, samples in file order),
cut into shards of `records_per_shard`. A shard is then written by one worker from exactly its slice of the plan, so
the files do not depend on the number of workers, and a rerun skips every shard already under its final name
(ShardWriter renames `.partial` files only once complete), giving the same bytes as an uninterrupted run. Per-shard
counts go to `<split>/.stats/<shard>.json` next to the shard, so the summary of a resumed run is complete too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time

from tqdm.auto import tqdm

from bioclip_jax.data.records import FORMAT_VERSION
from bioclip_jax.errors import InputError
from bioclip_jax.shards.build import Skip, build_record
from bioclip_jax.shards.output import Shard, ShardSink, Summary, check_manifest, write_summary
from bioclip_jax.shards.pool import default_workers, map_ordered
from bioclip_jax.shards.source import Plan, Source


def make_shards(source: Source, out: str, *, records_per_shard: int | None = None, resize: int | None = None,
                quality: int = 95, workers: int | None = None, prefix: str | None = None,
                progress: bool = True) -> Summary:
    """Writes OUT/<split>/<prefix or split>-NNNNN-of-NNNNN.array_record, the splits' summary.json and
    OUT/summary.json; an output already complete with the same settings is returned as it is. `records_per_shard`
    and `workers` default to the source's; `progress` shows tqdm bars."""
    started, out = time.perf_counter(), str(out)
    records_per_shard = source.records_per_shard if records_per_shard is None else records_per_shard
    workers = workers or source.workers or default_workers()
    manifest = output_manifest(source, records_per_shard=records_per_shard, resize=resize, quality=quality,
                               prefix=prefix)
    done = check_manifest(out, manifest)
    if done is None:
        plan = source.plan(out, workers=workers, progress=progress)
        try:
            shards = _cut(out, plan, records_per_shard, prefix)
            stats = _write(out, source, shards, resize=resize, quality=quality, workers=workers, progress=progress)
            done = write_summary(out, source.name, manifest, stats, plan.skipped, plan.input_errors, plan.extra)
        finally:
            for path in plan.scratch:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return Summary(done, out, time.perf_counter() - started, tuple(source.notes(done)))


def output_manifest(source: Source, *, records_per_shard: int, resize: int | None, quality: int,
                    prefix: str | None) -> dict:
    """The settings that define an output (checked before anything is written, so a typo cannot pin a folder)."""
    inputs = source.settings()  # first: a missing input is the error to see
    if records_per_shard < 1:
        raise InputError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if resize is not None and resize < 1:
        raise InputError(f"resize must be a positive size in pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be in 1..100, got {quality}")
    val_fraction = source.val_fraction
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split = {} if val_fraction is None else {"val_fraction": val_fraction}
    return {"format_version": FORMAT_VERSION, "source": source.name, **inputs, "prefix": prefix, **split,
            "records_per_shard": records_per_shard, "resize": resize, "quality": quality}


def _cut(out: str, plan: Plan, records_per_shard: int, prefix: str | None) -> dict[str, list[Shard]]:
    """Every split's groups -> its shards, numbered across groups in plan order (a source that cuts its own shards
    plans one group per shard: `Plan.whole_groups`). A split with neither samples nor skips has no folder."""
    shards: dict[str, list[Shard]] = {}
    for split, groups in plan.groups.items():
        if not any(len(g) for g in groups) and not plan.skipped.get(split):
            continue
        size = (max(map(len, groups), default=0) or 1) if plan.whole_groups else records_per_shard
        counts = [1] * len(groups) if plan.whole_groups else [math.ceil(len(g) / size) for g in groups]
        shards[split] = [Shard.at(out, split, prefix, sum(counts[:k]) + i, sum(counts),
                                  group[i * size:(i + 1) * size], k)
                         for k, group in enumerate(groups) for i in range(counts[k])]
    return shards


@dataclasses.dataclass(frozen=True)
class _Job:
    """Some shards for one worker, everything it needs, picklable."""
    source: Source
    shards: list[Shard]
    resize: int | None
    quality: int


def _write_job(job: _Job, progress) -> list[dict]:
    """Writes the job's shards (or, for a shard whose stats file was lost, only recounts it) -> their stats. Each
    shard is finished as soon as its last sample has been read."""
    sinks = [ShardSink(s) for s in job.shards]
    try:
        with contextlib.closing(job.source.read(job.shards)) as samples:
            for k, name, example in samples:
                sink = sinks[k]
                try:
                    if isinstance(example, Skip):
                        raise example
                    record = build_record(example, source=job.source.name, resize=job.resize, quality=job.quality)
                except Skip as s:
                    sink.skip(name, s)
                else:
                    sink.write(record, example.taxon)
                progress(1)
                if sink.left == 0:
                    sink.finish()
    except BaseException as e:
        for sink in sinks:
            sink.abort(e)
        raise
    return [sink.stats for sink in sinks]


def _write(out: str, source: Source, shards: dict[str, list[Shard]], *, resize: int | None, quality: int, workers: int,
           progress: bool) -> dict[str, list[dict]]:
    """Writes the shards not finished by an earlier run -> every split's shard stats, in shard order."""
    for split in shards:  # also for a split with only skipped samples: its summary.json goes there
        os.makedirs(os.path.join(out, split, ".stats"), exist_ok=True)
    flat = [s for split_shards in shards.values() for s in split_shards]
    finished = [s.finished for s in flat]  # by an earlier run
    todo = [s for s, done in zip(flat, finished) if not done]
    total, pending = sum(len(s.items) for s in flat), sum(len(s.items) for s in todo)
    jobs = source.jobs(todo)
    with tqdm(total=total, initial=total - pending, unit="img", desc=f"make-shards {source.name}",
              disable=not progress) as bar:
        results = map_ordered(_write_job, [_Job(source, job, resize, quality) for job in jobs], workers, bar)
    written = {id(s): st for job, job_stats in zip(jobs, results) for s, st in zip(job, job_stats)}
    stats = iter([s.read_stats() if done else written[id(s)] for s, done in zip(flat, finished)])
    return {split: [next(stats) for _ in split_shards] for split, split_shards in shards.items()}
