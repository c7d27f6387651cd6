"""Embedding and classifying collections too large for one call: the inputs of inputs.py, cut into parts of
`part_size` items; each host runs the parts whose number modulo the host count is its own (so every item is embedded
exactly once across hosts, and a rerun with another host count finds the same parts), writes each part atomically
(outputs.py) and skips the parts a previous run finished.

    summary = embed_job(model, collect_inputs(["photos/"]), "emb.parquet")

Worker threads decode and preprocess the next images while the device encodes the current batch. `encode_fn`
(preprocessed pixels [B, H, W, 3] -> unnormalised features [B, D]) is the one place the device is used: by default
the model on a mesh of this process's own devices (`host_encoder`), each batch split over them. The mesh is
host-local because hosts do unequal work (host i runs parts i, i + n, ...; a host whose parts were finished before
runs none): with no collective between hosts, none waits for another's call.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from bioclip_jax import mesh as mesh_lib
from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.errors import InputError
from bioclip_jax.inference.encoder import mesh_encoder
from bioclip_jax.inference.inputs import Inputs
from bioclip_jax.inference.model import IMAGE_ERRORS, Model, _run_padded, normalize_features, pick_preprocess
from bioclip_jax.inference.outputs import (
    EMB_COLUMN,
    FILE_COLUMN,
    ID_COLUMN,
    PartStore,
    assemble,
    job_manifest,
    output_format,
    parts_folder,
)

DEFAULT_PART_SIZE = 8192
EncodeFn = Callable[[np.ndarray], np.ndarray]
# (features [B, D] unnormalised, ids, file names, carried columns per item) -> the part's columns for these items
RowsFn = Callable[[np.ndarray, list, list, list], dict]


@dataclasses.dataclass
class Summary:
    """What a job did on this host and, for the whole job, where the output and the failures are."""
    output: str
    rows: int = 0           # rows written by this host in this run
    images: int = 0         # images encoded by this host in this run
    parts_done: int = 0     # parts this host finished in this run
    parts_skipped: int = 0  # parts a previous run had finished
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # the whole job's (file_name -> why)
    failures_file: str | None = None
    total_rows: int = 0     # rows in the output (process 0 after the last part)


def host_mesh() -> jax.sharding.Mesh:
    """This process's own devices: what embed and predict encode and score on."""
    return mesh_lib.make_mesh(jax.local_devices())


def host_encoder(model: Model, batch_size: int, mesh: jax.sharding.Mesh | None = None) -> EncodeFn:
    """The model replicated on `mesh` (default `host_mesh()`), each batch split over its devices and padded to one
    of a few compiled sizes. Every call must be this process's own: the mesh may not span hosts."""
    mesh = host_mesh() if mesh is None else mesh
    if len(mesh.local_devices) != mesh.devices.size:
        raise InputError("embed and predict encode on one host's devices; the mesh given spans several hosts")
    encoder = mesh_encoder(model, mesh)
    return lambda pixels: _run_padded(encoder.encode_pixels, pixels, batch_size)


def model_fingerprint(model: Model) -> dict:
    """What identifies a model's embeddings: its source, architecture and a checksum of a few weights."""
    leaves = jax.tree_util.tree_leaves(model.params)
    checksum = [float(np.asarray(jax.numpy.sum(jax.numpy.abs(leaf.astype(np.float32))))) for leaf in leaves[:3]]
    config = hashlib.sha256(repr(model.config).encode()).hexdigest()[:12]
    return {"source": model.source, "config": config, "weights": [round(c, 3) for c in checksum],
            "embed_dim": model.config.embed_dim}


def _iter_items(inputs: Inputs, indices: Iterator[int], preprocess: Preprocess, workers: int, ahead: int):
    """(index, pixels or None, id, carried, error) per item, in order; decoding runs `ahead` items in front."""
    def prepare(i):
        image, item_id, carried = inputs.load(i)
        return preprocess(image), item_id, carried

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        window: collections.deque = collections.deque()
        for i in indices:
            window.append((i, pool.submit(prepare, i)))
            if len(window) > ahead:
                yield _result(*window.popleft())
        while window:
            yield _result(*window.popleft())


def _result(i, future):
    try:
        pixels, item_id, carried = future.result()
        return i, pixels, item_id, carried, None
    except IMAGE_ERRORS as e:  # InputError is a ValueError: a missing, undecodable or refused image
        return i, None, None, None, str(e)


def run_parts(inputs: Inputs, store: PartStore, parts: Sequence[int], part_size: int, rows_fn: RowsFn,
              encode_fn: EncodeFn, preprocess: Preprocess, batch_size: int, progress: bool = True,
              workers: int | None = None, desc: str = "images") -> Summary:
    """Runs the given parts (skipping finished ones): decode, encode in batches, rows, one atomic write per part.
    encode_fn is called per batch of this process's readable images, as many times as this host's work needs."""
    summary = Summary(output=str(store.folder))
    todo = [p for p in parts if store.done(p) is None]
    summary.parts_skipped = len(parts) - len(todo)
    spans = {p: range(p * part_size, min((p + 1) * part_size, len(inputs))) for p in todo}
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    items = _iter_items(inputs, (i for p in todo for i in spans[p]), preprocess, workers, 2 * batch_size + workers)
    with tqdm(total=sum(len(s) for s in spans.values()), desc=desc, unit="img", disable=not progress,
              smoothing=0.1) as bar:
        for part in todo:
            table, failures = _run_part(inputs, spans[part], items, encode_fn, rows_fn, batch_size, bar)
            store.write(part, table, failures)
            summary.rows += table.num_rows if table is not None else 0
            summary.images += len(spans[part]) - len(failures)
            summary.parts_done += 1
    return summary


def _run_part(inputs: Inputs, span: range, items, encode_fn: EncodeFn, rows_fn: RowsFn, batch_size: int, bar):
    """One part's items, in batches of readable images -> (pyarrow Table or None, failures)."""
    columns: dict[str, list] = collections.defaultdict(list)
    failures: dict[str, str] = {}
    batch: list = []
    for n, _ in enumerate(span, 1):
        i, pixels, item_id, carried, error = next(items)
        if error is not None:
            failures[inputs.file_name(i)] = error
        else:
            batch.append((i, pixels, item_id, carried))
        if len(batch) == batch_size or (n == len(span) and batch):
            _encode_batch(batch, inputs, encode_fn, rows_fn, columns)
            bar.set_postfix_str(f"{len(failures)} unreadable" if failures else "", refresh=False)
            batch = []
        bar.update(1)
    return _table(columns), failures


def _encode_batch(batch, inputs: Inputs, encode_fn: EncodeFn, rows_fn: RowsFn, columns: dict) -> None:
    features = np.asarray(encode_fn(np.stack([b[1] for b in batch])), np.float32)
    if not np.isfinite(features).all():
        raise InputError("the model gave non-finite image embeddings; the weights are broken")
    rows = rows_fn(features, [b[2] for b in batch], [inputs.file_name(b[0]) for b in batch], [b[3] for b in batch])
    for name, values in rows.items():
        columns[name].extend(values)


def _table(columns: dict):
    import pyarrow as pa

    if not columns or not len(next(iter(columns.values()))):
        return None
    return pa.table({name: _arrow(name, values) for name, values in columns.items()})


def _arrow(name: str, values: list):
    import pyarrow as pa

    if name == EMB_COLUMN:  # a list of 1-d arrays: one flat buffer, no per-float Python objects
        matrix = np.stack(values)
        dtype = pa.float16() if matrix.dtype == np.float16 else pa.float32()
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), dtype),
                                                 matrix.shape[1]).cast(pa.list_(dtype))
    return pa.array(values)


def embed_rows(normalize: bool, float16: bool, column_names: list[str]) -> RowsFn:
    """emb-explorer's row: uuid, emb, file_name, then the carried columns (None where an item has none)."""
    def rows(features, ids, file_names, carried):
        features = normalize_features(features) if normalize else features
        features = features.astype(np.float16 if float16 else np.float32)
        out = {ID_COLUMN: [str(i) for i in ids], EMB_COLUMN: list(features), FILE_COLUMN: file_names}
        for name in column_names:
            out[name] = [c.get(name) for c in carried]
        return out
    return rows


def process_slice() -> tuple[int, int]:
    """(this process's index, the number of processes): jax.distributed's when it is initialised."""
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_job(inputs: Inputs, output: str, job: dict, rows_fn: RowsFn, encode_fn: EncodeFn, preprocess: Preprocess,
            batch_size: int, part_size: int = DEFAULT_PART_SIZE, progress: bool = True, model_source: str = "",
            formats: tuple[str, ...] = (".parquet", ".npy", ".csv", ".json"), desc: str = "images") -> Summary:
    """The shared loop of embed and predict: this host's parts, then (process 0) the failures file and, for
    single-file formats, the assembled file (the part folder is removed once it is written)."""
    if batch_size < 1 or part_size < 1:
        raise InputError(f"batch size and part size must be >= 1; got {batch_size} and {part_size}")
    fmt = output_format(output, formats)
    index, count = process_slice()
    parts = -(-len(inputs) // part_size)
    store = PartStore(parts_folder(output), {**job, "inputs": {"fingerprint": inputs.fingerprint(),
                                                               "items": len(inputs), "part_size": part_size}})
    store.open(index)
    summary = run_parts(inputs, store, range(index, parts, count), part_size, rows_fn, encode_fn, preprocess,
                        batch_size, progress, desc=desc)
    barrier("bioclip_jax.jobs.parts")
    records = [store.done(p) for p in range(parts)] if index == 0 else []
    if index == 0 and all(records):  # the whole job's summary, from every host's records
        summary.failures = {name: why for r in records for name, why in r["failures"].items()}
        summary.total_rows = sum(r["rows"] for r in records)
        if fmt == ".parquet":
            summary.failures_file = store.write_failures(summary.failures)
        elif summary.total_rows:  # every input failed: no file, and the parts folder keeps the failures
            assemble(store, parts, output, fmt, model_source)
            summary.output = output
            summary.failures_file = store.write_failures(summary.failures, os.path.splitext(output)[0]
                                                         + ".failures.csv")
            store.remove()
        else:
            summary.failures_file = store.write_failures(summary.failures)
    barrier("bioclip_jax.jobs.assembled")
    return summary


def embed_job(model: Model, inputs: Inputs, output: str, *, batch_size: int = 32, part_size: int = DEFAULT_PART_SIZE,
              preprocess: str | Preprocess | None = "pybioclip", normalize: bool = True, float16: bool = False,
              encode_fn: EncodeFn | None = None, progress: bool = True) -> Summary:
    """Embeds every input into `output` (.parquet part folder, .npy + .ids.csv, .csv or .json); resumable.
    encode_fn: this process's pixels [B, H, W, 3] -> unnormalised features [B, D] (default: `host_encoder`, the
    model on this host's devices); it is called as often as this host's parts need, so it may not be a collective
    over several hosts."""
    preprocess = pick_preprocess(model, preprocess)
    settings = {"normalize": normalize, "float16": float16,
                "preprocess": json.loads(json.dumps(dataclasses.asdict(preprocess))), "columns": inputs.column_names}
    job = job_manifest("embed", model_fingerprint(model), settings)
    return run_job(inputs, output, job, embed_rows(normalize, float16, inputs.column_names),
                   encode_fn or host_encoder(model, batch_size), preprocess, batch_size, part_size, progress,
                   model.source)


def describe(summary: Summary) -> str:
    """One line for the command line."""
    text = (f"{summary.images} images done in {summary.parts_done} parts"
            + (f" ({summary.parts_skipped} parts finished before)" if summary.parts_skipped else ""))
    if summary.total_rows:
        text += f"; {summary.output}: {summary.total_rows} rows"
    if summary.failures:
        text += f"; {len(summary.failures)} unreadable" + (f", listed in {summary.failures_file}"
                                                            if summary.failures_file else "")
    return text

