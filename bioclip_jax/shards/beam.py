"""make-shards on Apache Beam: TreeOfLife-200M (214M images) is past what one machine's process pool should prepare.
The pipeline reads the catalog and the image Parquet files (local or gs://), joins them by uuid, places every uuid by
its shuffle key (shards.tol200m) and writes each shard in one worker, through `build_record`: the shards, the per-shard
stats and the summaries are byte-identical to `make_shards(TreeOfLife200M(...))` on the same inputs.

    summary = make_shards_beam("catalog.parquet", ["images/*.parquet"], "shards/tol200m", runner="DirectRunner")

Counts of every skip reason (missing image, undecodable image, ...) are Beam metrics while it runs (the Dataflow
console shows them) and land in the summary.json files as with make-shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from etils import epath

from bioclip_jax.errors import InputError
from bioclip_jax.paths import is_url
from bioclip_jax.shards import tol200m
from bioclip_jax.shards.build import Skip, build_record
from bioclip_jax.shards.make import output_manifest
from bioclip_jax.shards.output import MANIFEST, SUMMARY, Shard, ShardSink, Summary, split_summary
from bioclip_jax.shards.tol10m import normalise

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "PrismRunner")
METRICS = "make_shards"  # the Beam metrics namespace


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise InputError("make-shards --runner needs Apache Beam: pip install 'bioclip_jax[beam]'") from None
    return beam


def _save_json(path: str, obj) -> None:
    """JSON next to the shards, local or gs:// (a local file is replaced atomically)."""
    text = json.dumps(obj, indent=1) + "\n"
    if is_url(path):
        epath.Path(path).write_text(text)
        return
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _load_json(path: str):
    p = epath.Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def _check_out(out: str, manifest: dict) -> dict | None:
    """make-shards' manifest rule, for local and gs:// outputs: refuse another plan's folder; return the summary of a
    finished one."""
    old = _load_json(os.path.join(out, MANIFEST))
    if old is None:
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        _save_json(os.path.join(out, MANIFEST), manifest)
        return None
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
        raise InputError(f"{out} holds shards made with other settings (differs in: {', '.join(diff)}); "
                         f"use another --out or delete it")
    return _load_json(os.path.join(out, SUMMARY))


def _build(uuid: str, sample, resize: int | None, quality: int) -> tuple:
    """One outcome -> ("record", bytes, taxon) or ("skip", reason, detail), counted in the Beam metrics. Records are
    built before the shuffle to shards, so that moves 224 px JPEGs rather than the providers' full-size images."""
    from apache_beam.metrics import Metrics

    try:
        if isinstance(sample, Skip):
            raise sample
        record = build_record(sample, source=tol200m.TreeOfLife200M.name, resize=resize, quality=quality)
    except Skip as s:
        Metrics.counter(METRICS, s.reason).inc()
        return ("skip", s.reason, s.detail)
    Metrics.counter(METRICS, "records").inc()
    return ("record", record, sample.taxon)


def _placer(seed: int, shards: int, resize: int | None, quality: int):
    def place(element):
        uuid, grouped = element
        key = tol200m.shuffle_key(seed, uuid)
        built = [_build(uuid, o, resize, quality)
                 for o in tol200m.outcomes(uuid, list(grouped["rows"]), list(grouped["images"]))]
        return tol200m.shard_of(key, shards), (key, uuid, built)
    return place


class _WriteShard:
    """Beam FlatMap body: (shard index, its uuids' built outcomes) -> the shard and its stats file -> the stats. A
    shard already under its final name with its stats (an earlier, interrupted run) is kept."""

    def __init__(self, out: str, shards: int, prefix: str | None):
        self.out, self.shards, self.prefix = out, shards, prefix

    def __call__(self, element):
        index, entries = element
        final = Shard.at(self.out, tol200m.SPLIT, self.prefix, index, self.shards, ())
        done = _load_json(final.stats_path) if epath.Path(final.path).exists() else None
        if done is not None:
            return [done]
        entries = sorted((e for e in entries if e is not None), key=lambda e: (e[0], e[1]))
        samples = [(uuid, b) for _, uuid, built in entries for b in built]
        with tempfile.TemporaryDirectory() as tmp:
            local = final if not is_url(self.out) else Shard.at(tmp, tol200m.SPLIT, self.prefix, index, self.shards, ())
            os.makedirs(os.path.dirname(local.stats_path), exist_ok=True)
            sink = ShardSink(dataclasses.replace(local, items=samples))
            for uuid, (kind, value, extra) in samples:
                sink.write(value, extra) if kind == "record" else sink.skip(uuid, Skip(value, extra))
            stats = sink.finish()
            if local is not final:  # stats first: a shard under its final name always has its stats
                epath.Path(local.stats_path).copy(final.stats_path, overwrite=True)
                epath.Path(local.path).copy(final.path, overwrite=True)
        return [stats]


def build_pipeline(p, source: tol200m.TreeOfLife200M, out: str, shards: int, *, prefix: str | None,
                   resize: int | None, quality: int):
    """The pipeline's graph on `p` -> the PCollection of every shard's stats."""
    beam = _import_beam()
    from apache_beam.io.parquetio import ReadAllFromParquetBatched, ReadFromParquetBatched

    catalog = source.parsed_catalog
    wanted = [c for c in catalog.columns.values() if c is not None]
    rows = (p | "read catalog" >> ReadFromParquetBatched(catalog.path, columns=wanted)
            | "catalog rows" >> beam.FlatMap(
                lambda t: [kv for b in t.to_batches() for kv in tol200m.catalog_rows(normalise(catalog, b))]))
    columns = source.columns[0]  # the same in every file (TreeOfLife200M.settings)
    images = (p | "image files" >> beam.Create(source.files)
              | "read images" >> ReadAllFromParquetBatched(columns=list(columns))
              | "image rows" >> beam.FlatMap(lambda t: list(tol200m.image_rows(t))))
    placed = ({"rows": rows, "images": images} | "join by uuid" >> beam.CoGroupByKey()
              | "build records" >> beam.Map(_placer(source.seed, shards, resize, quality)))
    every_shard = p | "shard indices" >> beam.Create([(i, None) for i in range(shards)])  # empty ones too
    return ((placed, every_shard) | beam.Flatten() | "by shard" >> beam.GroupByKey()
            | "write shards" >> beam.FlatMap(_WriteShard(out, shards, prefix)))


def make_shards_beam(catalog: str, images: str | list[str], out: str, *, runner: str = "DirectRunner",
                     pipeline_args: list[str] | tuple = (), records_per_shard: int = 10000, resize: int | None = None,
                     quality: int = 95, seed: int = 0, prefix: str | None = None) -> Summary:
    """TreeOfLife-200M -> OUT/train/ shards on a Beam runner (`pipeline_args`: its options, e.g. --project,
    --region, --temp_location for Dataflow), then the summaries, as `make_shards` writes them."""
    beam = _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if runner not in RUNNERS:
        raise InputError(f"unknown Beam runner {runner!r} (expected one of {', '.join(RUNNERS)})")
    started, out = time.perf_counter(), str(out)
    source = tol200m.TreeOfLife200M(catalog, images, records_per_shard=records_per_shard, seed=seed)
    manifest = output_manifest(source, records_per_shard=records_per_shard, resize=resize, quality=quality,
                               prefix=prefix)
    done = _check_out(out, manifest)
    notes: tuple[str, ...] = ()
    if done is None:
        shards = tol200m.num_shards(source.catalog_rows, records_per_shard)
        epath.Path(out, tol200m.SPLIT, ".stats").mkdir(parents=True, exist_ok=True)
        options = PipelineOptions(list(pipeline_args), runner=runner)
        p = beam.Pipeline(options=options)
        build_pipeline(p, source, out, shards, prefix=prefix, resize=resize, quality=quality)
        result = p.run()
        result.wait_until_finish()
        notes = (_metrics_line(result),)
        stats = [_load_json(Shard.at(out, tol200m.SPLIT, prefix, i, shards, ()).stats_path) for i in range(shards)]
        info = split_summary(source.name, tol200m.SPLIT, stats, [])
        _save_json(os.path.join(out, tol200m.SPLIT, SUMMARY), info)
        done = {"format_version": info["format_version"], "source": source.name, "settings": manifest,
                "records": info["records"], "skipped": info["skipped"]["count"], "input_errors": [],
                "splits": {tol200m.SPLIT: info}}
        _save_json(os.path.join(out, SUMMARY), done)
    return Summary(done, out, time.perf_counter() - started, notes)


def _metrics_line(result) -> str:
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS))["counters"]
    counts = {c.key.metric.name: c.committed for c in counters}
    return "beam metrics: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "beam metrics: -"
