"""Approximate nearest neighbours through faiss (faiss-cpu, the `search` extra) for `inference.search`.

The index is faiss's IVF with float16 scalar-quantised vectors (`IVF{nlist},SQfp16`, inner product on unit vectors):
k-means splits the rows into `nlist` lists and a query scans the `nprobe` lists nearest to it; float16 storage
halves memory at a cosine error far below the gaps between neighbours. It is saved beside the index (atomically)
with a record of the files it was built from, and rebuilt when they change. Its recall@10 against exact search is
measured on RECALL_QUERIES rows of the index (each row's own entry left out) and kept per nprobe.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np
from tqdm import tqdm

from bioclip_jax import paths
from bioclip_jax.errors import InputError

FORMAT_VERSION = 1
ADD_BLOCK = 65536  # rows normalised and added to faiss at a time
TRAIN_PER_LIST = 64  # k-means training rows per list (faiss warns below 39)
RECALL_QUERIES = 1000  # index rows used as queries to measure recall@10


def recall_at(approx, exact, k: int = 10) -> float:
    """Mean fraction of each query's exact top k found in its approximate top k."""
    found = [len(set(a[:k]) & set(e[:k])) / min(k, len(e)) for a, e in zip(approx, exact)]
    return float(np.mean(found)) if found else math.nan


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("approximate search needs faiss: pip install 'bioclip_jax[search]' (faiss-cpu)") from None
    return faiss


def default_nlist(rows: int) -> int:
    """sqrt(rows) lists, at most one per 39 rows (fewer leaves k-means too few points per list)."""
    return max(1, min(int(math.sqrt(rows)), rows // 39))


def default_nprobe(nlist: int) -> int:
    """A 32nd of the lists, at least 8: docs/search.md has the recall and speed this gives."""
    return max(1, min(nlist, max(8, nlist // 32)))


def _unit(block: np.ndarray) -> np.ndarray:
    block = np.array(block, np.float32)
    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return block


def cache_folder(index) -> str:
    """Where an index's faiss files live: `_faiss` inside a part folder (pandas and pyarrow skip names starting
    with "_"), `NAME.faiss` beside a file."""
    location = paths.resolve(index.path)
    return os.fspath(location / "_faiss") if location.is_dir() else os.fspath(index.path) + ".faiss"


def build(embeddings: np.ndarray, nlist: int, progress: bool = True):
    """A trained and filled faiss IVF index over the rows of `embeddings` (normalised here)."""
    faiss = _faiss()
    rows, dim = embeddings.shape
    index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(rows, min(rows, TRAIN_PER_LIST * nlist), replace=False))
    index.train(_unit(embeddings[sample]))
    for start in tqdm(range(0, rows, ADD_BLOCK), desc="faiss index", unit="block", disable=not progress):
        index.add(_unit(embeddings[start:start + ADD_BLOCK]))
    return index


def search(index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores [Q, k] and rows [Q, k] (-1 and -inf where the probed lists held fewer than k rows)."""
    scores, rows = index.search(_unit(vectors), k)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    return scores, rows.astype(np.int64)


def measure_recall(embeddings: np.ndarray, index, exact_top_k: Callable, k: int = 10,
                   queries: int = 1000) -> float:
    """recall@k of `index` against `exact_top_k` with rows of the index as queries, each row's own entry left out."""
    picked = np.sort(np.random.default_rng(1).choice(len(embeddings), min(queries, len(embeddings)), replace=False))
    vectors = _unit(embeddings[picked])
    want = min(k + 1, len(embeddings))
    without_self = lambda rows: [[r for r in row if r != own][:k] for own, row in zip(picked, rows)]
    exact = without_self(exact_top_k(vectors, want)[1])
    approx = without_self(search(index, vectors, want)[1])
    return recall_at(approx, exact, k)


def open_index(index, exact_top_k: Callable, nlist: int | None = None, nprobe: int | None = None,
               progress: bool = True) -> tuple[object, dict]:
    """The saved faiss index of `index` when it matches its files, else a new one (saved when the folder is
    writable); with the report the searcher prints (factory, nprobe, recall@10, where it is saved)."""
    faiss = _faiss()
    nlist = nlist or default_nlist(len(index))
    nprobe = nprobe or default_nprobe(nlist)
    if not 1 <= nlist <= len(index) or nprobe < 1:
        raise InputError(f"--nlist {nlist} / --nprobe {nprobe}: expected 1 <= nlist <= {len(index)} rows, nprobe >= 1")
    folder = paths.resolve(cache_folder(index))
    data, record = folder / f"ivf{nlist}_sqfp16.index", folder / f"ivf{nlist}_sqfp16.json"
    key = {"version": FORMAT_VERSION, "files": [list(f) for f in index.files], "rows": len(index), "dim": index.dim}
    meta = json.loads(record.read_text()) if record.exists() else {}
    built = meta.get("key") != key or not data.exists()
    if built:
        ann = build(index.embeddings, nlist, progress)
        meta = {"key": key, "recall_at_10": {}}
    else:
        ann = faiss.deserialize_index(np.frombuffer(data.read_bytes(), np.uint8))
    ann.nprobe = nprobe
    recall = meta["recall_at_10"].get(str(nprobe))
    if recall is None:
        recall = meta["recall_at_10"][str(nprobe)] = measure_recall(index.embeddings, ann, exact_top_k,
                                                                    queries=RECALL_QUERIES)
    saved = _save(folder, data, record, ann if built else None, meta)
    report = {"search": "faiss", "factory": f"IVF{nlist},SQfp16", "nprobe": nprobe, "rows": len(index),
              "recall_at_10": recall, "recall_queries": min(RECALL_QUERIES, len(index)), "built": built,
              "saved": saved}
    return ann, report


def _save(folder, data, record, ann, meta: dict) -> str | None:
    """Writes the index (when new) then its record, each atomically; a read-only location keeps it in memory only
    (the path written, else None)."""
    try:
        paths.make_dirs(folder)
        if ann is not None:
            paths.write_atomic(data, _faiss().serialize_index(ann).tobytes())
        paths.write_atomic(record, json.dumps(meta, indent=1).encode())
    except OSError:
        return None
    return os.fspath(data)
