"""Shard writers: raw images -> ArrayRecord shards of `Record`s (one per image, JPEG bytes). Format and layout are
documented in docs/data_format.md.

    write_treeoflife_shards("data/shard-{000000..000003}.tar", "shards/tol", resize=224)
    write_folder_shards("data/rare/metadata.csv", "shards/rare")
    write_synthetic_shards("shards/synthetic", SyntheticConfig())

Every run first makes a plan: each split's samples in a fixed order (inputs in the order given, samples in file order),
cut into shards of `records_per_shard`. A shard is then written by one worker from exactly its slice of the plan, so
the files do not depend on the number of workers, and a rerun skips every shard already under its final name
(ShardWriter renames `.partial` files only once complete), giving the same bytes as an uninterrupted run. Per-shard
counts go to `<split>/.stats/<shard>.json` next to the shard, so the summary of a resumed run is complete too.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from typing import Any

from tqdm.auto import tqdm

from bioclip_jax.data import sources, tol10m
from bioclip_jax.data.records import FORMAT_VERSION, SHARD_SUFFIX, Record, ShardWriter
from bioclip_jax.data.sources import Skip
from bioclip_jax.errors import InputError

MANIFEST = "make_shards.json"
SUMMARY = "summary.json"


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def is_val(seed: int, example_id: str, fraction: float) -> bool:
    """Deterministic train/val assignment from (seed, id): stable across runs, machines and Python versions (the
    built-in hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass(frozen=True, eq=False)
class _Task:
    """One output shard: everything a worker needs, picklable."""
    source: str
    path: str
    stats_path: str
    items: list
    resize: int | None
    quality: int
    root: str = ""  # folder source: where `filepath` is relative to; synthetic: the spool file; tol10m: the tar
    plan: str = ""  # tol10m: the tar's plan file (its images' catalog rows); items index its rows of `split`
    split: str = ""


# ----------------------------------------------------------------------------------------------------- workers

_TICK = None  # how a worker reports processed samples: a shared counter in pool workers, the bar itself inline


def _init_worker(counter) -> None:
    global _TICK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n
    _TICK = tick


def _item_name(task: _Task, item) -> str:
    """How a skipped sample is named in summaries: the tar member, the CSV filepath or the synthetic id."""
    if task.source == "treeoflife":
        return f"{item.tar}:{item.key}.{next((e for e in sources.IMAGE_EXTS if e in item.members), 'jpg')}"
    return item["filepath"] if task.source == "folder" else item[0]


def _load(task: _Task, item, files: dict) -> tuple[str, bytes, sources.Taxon, str]:
    """-> (id, JPEG bytes, taxon, label), or raises Skip."""
    if task.source == "treeoflife":
        return (item.key, *sources.load_tar_sample(item, files, task.resize, task.quality), "")
    if task.source == "folder":
        return (item["filepath"], *sources.load_folder_row(task.root, item, task.resize, task.quality),
                item.get("class", ""))
    example_id, offset, size, ranks, common = item  # synthetic: encoded into the spool file already
    return example_id, sources.read_at(files, task.root, offset, size), sources.Taxon.from_ranks(ranks, common), ""


class _ShardOutput:
    """One shard being filled, item by item: records go to its ShardWriter (none when the shard exists and only its
    lost stats are recounted), counts to its stats. `finish` writes the stats, then renames the shard into place, so a
    shard under its final name always has its stats."""

    def __init__(self, task: _Task):
        self.task, self.left = task, len(task.items)
        self.writer = None if os.path.exists(task.path) else ShardWriter(task.path)
        self.stats = {"file": os.path.basename(task.path), "records": 0, "skipped": [],
                      "kingdoms": collections.Counter()}

    def add(self, load, name) -> None:
        """load() -> (id, JPEG bytes, taxon, label) or raises Skip; name() names a skipped sample."""
        try:
            example_id, jpeg, taxon, label = load()
        except Skip as s:
            self.stats["skipped"].append({"name": name(), "reason": s.reason, "detail": s.detail})
        else:
            if self.writer is not None:
                self.writer.write(Record(id=example_id, image=jpeg, taxon=taxon, source=self.task.source,
                                         label=label))
            self.stats["records"] += 1
            self.stats["kingdoms"][taxon.ranks[0] or "(none)"] += 1
        self.left -= 1
        if _TICK is not None:
            _TICK(1)

    def finish(self) -> dict:
        _save_json(self.task.stats_path, self.stats)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.stats

    def abort(self, e: BaseException) -> None:
        if self.writer is not None:
            self.writer.__exit__(type(e), e, None)  # closes and removes the .partial file
            self.writer = None


def _write_shard(task: _Task) -> dict:
    """Writes one shard (or, when the shard exists but its stats file was lost, only recounts it) -> its stats."""
    if os.path.exists(task.path) and os.path.exists(task.stats_path):
        with open(task.stats_path) as f:
            return json.load(f)
    output = _ShardOutput(task)
    files: dict = {}
    try:
        for item in task.items:
            output.add(lambda: _load(task, item, files), lambda: _item_name(task, item))
        return output.finish()
    except BaseException as e:
        output.abort(e)
        raise
    finally:
        for f in files.values():
            f.close()


def _write_tar_unit(tasks: list[_Task]) -> list[dict]:
    """The unfinished shards of one tol10m tar, written from a single streamed pass over the tar (gzip cannot seek)
    -> their stats. Each shard is finished as soon as its last image has been read."""
    tar, plan = tasks[0].root, tol10m.read_plan(tasks[0].plan)
    outputs = [_ShardOutput(t) for t in tasks]
    wanted = {plan[t.split][i]["ordinal"]: (output, plan[t.split][i]) for t, output in zip(tasks, outputs)
              for i in t.items}
    resize, quality = tasks[0].resize, tasks[0].quality

    def load(row: dict, data):
        if isinstance(data, Skip):
            raise data
        taxon = tol10m.catalog_taxon(row)
        if taxon.empty and not taxon.common_name:
            raise Skip("no taxonomy")
        return row["id"], sources.encode_image(data, resize=resize, quality=quality), taxon, ""

    def not_reached():  # what the stream never yielded: the tar ended (damaged) before these members
        for ordinal in sorted(wanted):
            yield ordinal, Skip("missing image", "the tar ended before this member")

    try:
        streamed = ((ordinal, data) for ordinal, _, data in tol10m.iter_tar_images(tar, wanted))
        for ordinal, data in itertools.chain(streamed, not_reached()):
            output, row = wanted.pop(ordinal)
            output.add(lambda: load(row, data), lambda: f"{tar}:{row['member']}")
            if output.left == 0:
                output.finish()
    except BaseException as e:
        for output in outputs:
            output.abort(e)
        raise
    return [output.stats for output in outputs]


def _save_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _indexed(job):
    i, fn, payload = job
    return i, fn(payload)


def map_ordered(fn, payloads: list, workers: int, bar=None) -> list:
    """[fn(p) for p in payloads] in a pool (inline for one worker or one payload); `bar` follows the records that
    workers report through _TICK."""
    global _TICK
    if workers <= 1 or len(payloads) <= 1:
        _TICK = bar.update if bar is not None else None
        try:
            return [fn(p) for p in payloads]
        finally:
            _TICK = None
    # forkserver: workers neither inherit a parent's JAX threads (fork) nor re-import everything each (spawn).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bioclip_jax.data.writers"])  # imported once in the server, not per worker
    else:
        ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    start = bar.n if bar is not None else 0
    results: list = [None] * len(payloads)
    with ctx.Pool(min(workers, len(payloads)), initializer=_init_worker, initargs=(counter,)) as pool:
        it = pool.imap_unordered(_indexed, [(i, fn, p) for i, p in enumerate(payloads)])
        for _ in payloads:
            while True:
                try:
                    i, results[i] = it.next(timeout=0.25)
                    break
                except multiprocessing.TimeoutError:
                    pass
                finally:
                    if bar is not None:
                        bar.n = start + counter.value
                        bar.refresh()
    return results


# ----------------------------------------------------------------------------------------------------- runs


def _check_manifest(out: str, manifest: dict) -> dict | None:
    """Records what is being written, and refuses to mix shards of another plan into `out`. Returns the previous
    summary when that run already finished (every shard and its stats present): then nothing needs redoing."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise InputError(f"{out} holds shards made with other settings (differs in: {', '.join(diff)}); "
                             f"use another --out or delete it")
        try:
            with open(os.path.join(out, SUMMARY)) as f:
                summary = json.load(f)
            needed = [os.path.join(out, split, name) for split, info in summary["splits"].items()
                      for name in [SUMMARY] + [s["file"] for s in info["shards"]]
                      + [os.path.join(".stats", s["file"] + ".json") for s in info["shards"]]]
            if all(os.path.exists(p) for p in needed):
                return summary
        except (OSError, ValueError, KeyError):
            pass
        return None
    os.makedirs(out, exist_ok=True)
    _save_json(path, manifest)
    return None


def _split_summary(source: str, split: str, stats: list[dict], skipped: list[dict]) -> dict:
    skipped = skipped + [s for st in stats for s in st["skipped"]]
    kingdoms: collections.Counter = collections.Counter()
    for st in stats:
        kingdoms.update(st["kingdoms"])
    return {"format_version": FORMAT_VERSION, "source": source, "split": split,
            "records": sum(st["records"] for st in stats),
            "shards": [{"file": st["file"], "records": st["records"]} for st in stats],
            "skipped": {"count": len(skipped), "reasons": dict(collections.Counter(s["reason"] for s in skipped)),
                        "items": skipped},
            "kingdoms": dict(sorted(kingdoms.items(), key=lambda kv: (-kv[1], kv[0])))}


def _write_plan(out: str, source: str, manifest: dict, plan: dict[str, list], skipped: dict[str, list],
                input_errors: list[dict], *, records_per_shard: int, resize: int | None, quality: int, workers: int,
                prefix: str | None, verbose: bool, root: str = "", started: float | None = None) -> dict:
    """Cuts every split's ordered items into shards, writes the missing ones and the summaries."""
    tasks: dict[str, list[_Task]] = {}
    for split, items in plan.items():
        if not items and not skipped.get(split):
            continue
        count = math.ceil(len(items) / records_per_shard)
        tasks[split] = [_Task(source, *_shard_paths(out, split, prefix, i, count),
                              items[i * records_per_shard:(i + 1) * records_per_shard], resize, quality, root)
                        for i in range(count)]
    return _write_tasks(out, source, manifest, tasks, skipped, input_errors, workers=workers, verbose=verbose,
                        started=started)


def _shard_paths(out: str, split: str, prefix: str | None, index: int, count: int) -> tuple[str, str]:
    """-> (shard path, its stats path)."""
    name = shard_name(prefix or split, index, count)
    return os.path.join(out, split, name), os.path.join(out, split, ".stats", name + ".json")


def _write_tasks(out: str, source: str, manifest: dict, tasks: dict[str, list[_Task]], skipped: dict[str, list],
                 input_errors: list[dict], *, workers: int, verbose: bool, started: float | None = None,
                 extra: dict | None = None, unit=None) -> dict:
    """Writes the shards not finished by an earlier run, then the summaries (`extra` joins OUT/summary.json).
    Without `unit` every shard is one job; with it, the shards with the same unit(task) key are one job of
    _write_tar_unit (tasks are handed to it in plan order)."""
    for split in tasks:
        os.makedirs(os.path.join(out, split, ".stats"), exist_ok=True)
    flat = [t for split_tasks in tasks.values() for t in split_tasks]
    finished = [os.path.exists(t.path) and os.path.exists(t.stats_path) for t in flat]  # from an earlier run
    todo = [t for t, done in zip(flat, finished) if not done]
    total, pending = sum(len(t.items) for t in flat), sum(len(t.items) for t in todo)
    with tqdm(total=total, initial=total - pending, unit="img", desc=f"make-shards {source}",
              disable=not verbose) as bar:
        if unit is None:
            written = iter(map_ordered(_write_shard, todo, workers, bar))
        else:
            jobs: dict = collections.defaultdict(list)
            for t in todo:
                jobs[unit(t)].append(t)
            results = map_ordered(_write_tar_unit, list(jobs.values()), workers, bar)
            by_task = {id(t): st for job, job_stats in zip(jobs.values(), results) for t, st in zip(job, job_stats)}
            written = iter([by_task[id(t)] for t in todo])
    stats = [_write_shard(t) if done else next(written) for t, done in zip(flat, finished)]  # done: reads its stats
    summary = {"format_version": FORMAT_VERSION, "source": source, "settings": manifest, "records": 0,
               "skipped": len(input_errors), "input_errors": input_errors, **(extra or {}), "splits": {}}
    for split, split_tasks in tasks.items():
        split_stats, stats = stats[:len(split_tasks)], stats[len(split_tasks):]
        info = _split_summary(source, split, split_stats, skipped.get(split, []))
        _save_json(os.path.join(out, split, SUMMARY), info)
        summary["splits"][split] = info
        summary["records"] += info["records"]
        summary["skipped"] += info["skipped"]["count"]
    _save_json(os.path.join(out, SUMMARY), summary)
    if verbose:
        print_summary(summary, out, time.perf_counter() - started if started else None)
    return summary


def print_summary(summary: dict, out: str, seconds: float | None = None) -> None:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    print(f"make-shards {summary['source']}: {summary['records']} records, {summary['skipped']} skipped -> {out}{took}")
    for split, info in summary["splits"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in info["skipped"]["reasons"].items())
        print(f"  {split}: {info['records']} records in {len(info['shards'])} shard(s)"
              + (f"; skipped {info['skipped']['count']} ({reasons})" if reasons else ""))
    kingdoms = collections.Counter()
    for info in summary["splits"].values():
        kingdoms.update(info["kingdoms"])
    if kingdoms:
        top = ", ".join(f"{k} {n}" for k, n in kingdoms.most_common(8))
        print(f"  kingdoms: {top}" + (f" and {len(kingdoms) - 8} more" if len(kingdoms) > 8 else ""))
    if "catalog" in summary:
        print("  " + tol10m.describe_join(summary["catalog"]))
    for err in summary["input_errors"]:
        print(f"  input error: {err['name']}: {err['reason']} ({err['detail']})")


def _split_by_id(items: list, ids: list[str], seed: int, val_fraction: float):
    """-> ({"train": [...], "val": [...]}, {split: [skipped duplicates]}). A repeated id goes the way of its first
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
    return plan, skipped


def _finished_before(out: str, manifest: dict, verbose: bool, started: float) -> dict | None:
    """The summary of an output already completed with these settings (printed), else None."""
    done = _check_manifest(out, manifest)
    if done is not None and verbose:
        print_summary(done, out, time.perf_counter() - started)
    return done


def _settings(*, records_per_shard: int, resize: int | None, quality: int, val_fraction: float | None = None,
              **kw) -> dict:
    """The settings that define an output (checked before anything is written, so a typo cannot pin a folder)."""
    if records_per_shard < 1:
        raise InputError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if resize is not None and resize < 1:
        raise InputError(f"resize must be a positive size in pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be in 1..100, got {quality}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split = {} if val_fraction is None else {"val_fraction": val_fraction}
    return {"format_version": FORMAT_VERSION, **kw, **split, "records_per_shard": records_per_shard,
            "resize": resize, "quality": quality}


# ----------------------------------------------------------------------------------------------------- public API


def write_treeoflife_shards(inputs: str | list[str], out: str, *, records_per_shard: int = 10000,
                            val_fraction: float = 0.05, seed: int = 0, resize: int | None = None, quality: int = 95,
                            workers: int | None = None, prefix: str | None = None, verbose: bool = True) -> dict:
    """TreeOfLife-10M webdataset tars (folders, globs or brace patterns) -> OUT/{train,val}/ shards. Returns the
    summary (also in OUT/summary.json)."""
    started, out, workers = time.perf_counter(), str(out), workers or default_workers()
    tars = sources.find_tars(inputs)
    manifest = _settings(source="treeoflife", inputs=[[t, os.path.getsize(t)] for t in tars], seed=seed,
                         val_fraction=val_fraction, records_per_shard=records_per_shard, resize=resize,
                         quality=quality, prefix=prefix)
    done = _finished_before(out, manifest, verbose, started)
    if done is not None:
        return done
    indexed = map_ordered(sources.index_tar, tars, workers)
    samples = [s for found, _ in indexed for s in found]
    input_errors = [e for _, errors in indexed for e in errors]
    plan, skipped = _split_by_id(samples, [s.key for s in samples], seed, val_fraction)
    return _write_plan(out, "treeoflife", manifest, plan, skipped, input_errors, records_per_shard=records_per_shard,
                       resize=resize, quality=quality, workers=workers, prefix=prefix, verbose=verbose,
                       started=started)


def write_folder_shards(csv_path: str, out: str, *, records_per_shard: int = 10000, val_fraction: float = 0.05,
                        seed: int = 0, resize: int | None = None, quality: int = 95, workers: int | None = None,
                        prefix: str | None = None, verbose: bool = True) -> dict:
    """An image folder described by BioCLIP's metadata.csv (filepath, class, optional ranks and common_name)
    -> OUT/{train,val}/ shards; `class` becomes Record.label. Use val_fraction=0 for an evaluation set."""
    started, out, workers = time.perf_counter(), str(out), workers or default_workers()
    csv_path = os.path.join(csv_path, "metadata.csv") if os.path.isdir(csv_path) else str(csv_path)
    root, rows = sources.read_metadata_csv(csv_path)
    with open(csv_path, "rb") as f:
        csv_digest = hashlib.sha256(f.read()).hexdigest()  # an edited CSV is another plan
    manifest = _settings(source="folder", inputs=os.path.abspath(csv_path), csv_sha256=csv_digest, seed=seed,
                         val_fraction=val_fraction, records_per_shard=records_per_shard, resize=resize,
                         quality=quality, prefix=prefix)
    done = _finished_before(out, manifest, verbose, started)
    if done is not None:
        return done
    plan, skipped = _split_by_id(rows, [r["filepath"] for r in rows], seed, val_fraction)
    return _write_plan(out, "folder", manifest, plan, skipped, [], records_per_shard=records_per_shard,
                       resize=resize, quality=quality, workers=workers, prefix=prefix, verbose=verbose, root=root,
                       started=started)


def write_synthetic_shards(out: str, config=None, *, records_per_shard: int = 1000, val_per_species: int = 2,
                           resize: int | None = None, quality: int = 95, workers: int = 1, prefix: str | None = None,
                           verbose: bool = True, generator=None) -> dict:
    """The synthetic tree of life -> OUT/train, OUT/val (the seen species; `val_per_species` images of each, at most
    all but one, chosen by a hash of (config.seed, id)) and OUT/heldout (every image of the held-out species).

    The generator is one sequential iterator, so images are drawn and encoded here into a spool file once; `workers`
    only parallelises copying the spool into shards, which rarely pays. `generator` replaces
    SyntheticTreeOfLife(config) by any object with `iter_examples(split)` (and optionally `.config`)."""
    started, out = time.perf_counter(), str(out)
    if generator is None:
        from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife

        config = config or SyntheticConfig()
        generator = SyntheticTreeOfLife(config)
    config = config or getattr(generator, "config", None)
    seed = getattr(config, "seed", 0)
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    manifest = _settings(source="synthetic", inputs=settings, val_per_species=val_per_species,
                         records_per_shard=records_per_shard, resize=resize, quality=quality, prefix=prefix)
    done = _finished_before(out, manifest, verbose, started)
    if done is not None:
        return done
    spool = os.path.join(out, ".synthetic.spool")
    items: dict[str, list] = {"seen": [], "heldout": []}
    skipped: dict[str, list] = {"train": [], "val": [], "heldout": []}
    seen_ids: set[str] = set()
    with open(spool, "wb") as f, tqdm(unit="img", desc="drawing synthetic images", disable=not verbose) as bar:
        for split in items:
            for example_id, image, taxon in generator.iter_examples(split):
                bar.update()
                if example_id in seen_ids:
                    skipped["train" if split == "seen" else split].append(
                        {"name": example_id, "reason": "duplicate id", "detail": ""})
                    continue
                seen_ids.add(example_id)
                jpeg = sources.encode_image(image, resize=resize, quality=quality)
                items[split].append((example_id, f.tell(), len(jpeg), list(dataclasses.astuple(taxon)[:7]),
                                     taxon.common_name))
                f.write(jpeg)
    by_species: dict[tuple, list] = collections.defaultdict(list)
    for item in items["seen"]:
        by_species[tuple(item[3])].append(item[0])
    val_ids = set()
    for ids in by_species.values():
        ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())
        val_ids.update(ranked[:max(0, min(val_per_species, len(ids) - 1))])
    plan = {"train": [it for it in items["seen"] if it[0] not in val_ids],
            "val": [it for it in items["seen"] if it[0] in val_ids], "heldout": items["heldout"]}
    try:
        return _write_plan(out, "synthetic", manifest, plan, skipped, [], records_per_shard=records_per_shard,
                           resize=resize, quality=quality, workers=workers, prefix=prefix, verbose=verbose,
                           root=spool, started=started)
    finally:
        os.remove(spool)


def write_tol10m_shards(catalog: str, images: str | list[str], out: str, *, records_per_shard: int = 10000,
                        resize: int | None = None, quality: int = 95, workers: int | None = None,
                        prefix: str | None = None, verbose: bool = True) -> dict:
    """TreeOfLife-10M as published (tars of `<treeoflife_id>.jpg`, gzip or not, plus catalog.csv or a Parquet
    catalog with the same columns) -> OUT/<split>/ shards, the split being the catalog's. Returns the summary (also
    in OUT/summary.json), whose `catalog` section names the images without a row and the rows without an image.

    Gzip tars cannot seek, so a tar is a unit of work: one worker streams it once and fills all its shards. A shard
    never spans two tars, so each tar's shards are numbered in the plan before any is written, and a rerun streams
    only the tars with unfinished shards."""
    started, out, workers = time.perf_counter(), str(out), workers or default_workers()
    columns = tol10m.open_catalog(catalog)  # a bad header fails before the long passes over the tars
    tars = sources.find_tars(images, suffixes=tol10m.TAR_SUFFIXES)
    manifest = _settings(source="tol10m", inputs=[[t, os.path.getsize(t)] for t in tars],
                         catalog=[os.path.abspath(columns.path), _file_sha256(columns.path)],
                         records_per_shard=records_per_shard, resize=resize, quality=quality, prefix=prefix)
    done = _finished_before(out, manifest, verbose, started)
    if done is not None:
        return done
    with tqdm(total=len(tars), unit="tar", desc="indexing tars", disable=not verbose) as bar:
        indexed = map_ordered(_index_tar, tars, workers, bar)
    plans = os.path.join(out, ".plan")
    os.makedirs(plans, exist_ok=True)
    plan_paths = [os.path.join(plans, f"{k:05d}.arrow") for k in range(len(tars))]
    input_errors = [e for _, errors in indexed for e in errors]
    names = [tar_names for tar_names, _ in indexed]
    del indexed
    counts, duplicates, info = tol10m.join(columns, tars, names, plan_paths, verbose)
    del names  # the plan files hold what the workers need
    tasks: dict[str, list[_Task]] = {}
    for split in sorted({s for c in counts for s in c} | set(duplicates)):
        per_tar = [math.ceil(c.get(split, 0) / records_per_shard) for c in counts]
        tasks[split] = []
        for tar, plan_path, n, shards in zip(tars, plan_paths, (c.get(split, 0) for c in counts), per_tar):
            for i in range(shards):  # numbered across tars: shard k of the split is the k-th in tar order
                paths = _shard_paths(out, split, prefix, len(tasks[split]), sum(per_tar))
                tasks[split].append(_Task("tol10m", *paths, range(i * records_per_shard,
                                                                  min(n, (i + 1) * records_per_shard)),
                                          resize, quality, root=tar, plan=plan_path, split=split))
    summary = _write_tasks(out, "tol10m", manifest, tasks, duplicates, input_errors,
                           workers=workers, verbose=verbose, started=started, extra={"catalog": info},
                           unit=lambda t: t.root)
    shutil.rmtree(plans)  # the output is complete: a rerun returns its summary without planning again
    return summary


def _index_tar(path: str) -> tuple[list[str], list[dict]]:
    result = tol10m.list_tar_images(path)
    if _TICK is not None:
        _TICK(1)
    return result


def _file_sha256(path: str) -> str:
    """An edited catalog is another plan (read in blocks: the published catalog is several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
