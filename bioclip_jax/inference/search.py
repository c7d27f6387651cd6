"""Nearest-neighbour search over what `embed` writes: by text, by image file or by an id in the index.

An index is one of embed's outputs (read by `read_index`, the one place that knows their layouts):
- a folder of Parquet parts (emb-explorer's layout: `uuid`, `emb` as list<float32> or list<float16>, `file_name`,
  carried columns) with embed's `_manifest.json`, which records the model; or one .parquet file;
- a .npy matrix with its `NAME.ids.csv` (uuid, file_name, carried columns) beside it;
- pybioclip's .json ({"model", "embeddings": {id: [floats]}}).

Exact search scores every row on device (`topk.DeviceBank`, rows sharded over this host's devices). Approximate
search uses a faiss IVF index (faiss-cpu: the `search` extra), built once and saved beside the index (a `_faiss`
folder inside a part folder, `NAME.faiss` beside a file); its recall@10 against exact search is measured on
queries drawn from the index when it is built (and for each new nprobe), and reported with every search.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from bioclip_jax import paths
from bioclip_jax.errors import InputError
from bioclip_jax.inference.outputs import (
    EMB_COLUMN,
    FILE_COLUMN,
    ID_COLUMN,
    ID_COLUMNS,
    MANIFEST,
    manifest_preprocess,
    manifest_source,
)


@dataclasses.dataclass(eq=False)
class Index:
    """Embeddings [N, D] (float32 or float16, as stored) and their rows' other columns (a pyarrow Table: the id
    column first, then file_name and the carried columns)."""

    path: str
    embeddings: np.ndarray
    table: Any
    id_column: str
    model: str | None = None  # the model that embedded the index, when its output records it
    preprocess: dict | None = None  # embed's image preprocessing, from the manifest
    files: list = dataclasses.field(default_factory=list)  # (name, bytes) of what was read: a saved faiss index's key

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def rows_of(self, ids) -> list[int]:
        """Index rows of the given ids; an id not in the index is an InputError naming it."""
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(pa.array([str(i) for i in ids]), value_set=self.table.column(self.id_column))
        missing = [i for i, r in zip(ids, found.to_pylist()) if r is None]
        if missing:
            raise InputError(f"{self.path}: no row has {self.id_column} {missing[0]!r}")
        return found.to_pylist()


def read_index(path: str | os.PathLike) -> Index:
    """Reads an index in any of embed's layouts (see the module docstring)."""
    path = os.fspath(path)
    location = paths.resolve(path)
    if not location.exists():
        raise InputError(f"index {path}: does not exist")
    if location.is_dir():
        return _read_folder(path, location)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return _from_table(path, _read_parquet(location), [(location.name, _size(location))])
    if suffix == ".npy":
        return _read_npy(path, location)
    if suffix == ".json":
        return _read_json(path, location)
    raise InputError(f"index {path}: expected a folder of Parquet parts, a .parquet, .npy (+ .ids.csv) or .json file")


def _size(location) -> int:
    return location.stat().length


def _read_parquet(location):
    import pyarrow.parquet as pq

    try:
        if paths.is_url(location):
            return pq.read_table(io.BytesIO(location.read_bytes()))
        return pq.read_table(os.fspath(location), memory_map=True)
    except Exception as e:  # pyarrow's errors name no file
        raise InputError(f"{location}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _read_folder(path: str, folder) -> Index:
    import pyarrow as pa

    parts = sorted(p for p in folder.iterdir() if p.name.endswith(".parquet") and p.name[0] not in "._")
    if not parts:
        raise InputError(f"index {path}: the folder holds no .parquet parts (is it an output of `embed`?)")
    table = pa.concat_tables([_read_parquet(p) for p in parts], promote_options="default")
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else {}
    return _from_table(path, table, [(p.name, _size(p)) for p in parts], model=manifest_source(manifest),
                       preprocess=manifest_preprocess(manifest))


def _read_npy(path: str, location) -> Index:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    ids_location = paths.resolve(os.path.splitext(path)[0] + ".ids.csv")
    if not ids_location.exists():
        raise InputError(f"index {path}: its ids file {ids_location} does not exist (embed writes both)")
    try:
        matrix = (np.load(io.BytesIO(location.read_bytes())) if paths.is_url(location)
                  else np.load(os.fspath(location), mmap_mode="r", allow_pickle=False))
    except ValueError as e:
        raise InputError(f"index {path}: not a readable .npy matrix ({e})") from None
    header = ids_location.read_text().split("\n", 1)[0].split(",")
    table = pcsv.read_csv(io.BytesIO(ids_location.read_bytes()),
                          convert_options=pcsv.ConvertOptions(column_types={h: pa.string() for h in header}))
    if matrix.ndim != 2 or len(matrix) != table.num_rows:
        raise InputError(f"index {path}: expected a [{table.num_rows}, dim] matrix (one row per line of "
                         f"{ids_location}), got shape {matrix.shape}")
    files = [(location.name, _size(location)), (ids_location.name, _size(ids_location))]
    return _validated(Index(path, matrix, table, _id_column(path, table.column_names), files=files))


def _read_json(path: str, location) -> Index:
    import pyarrow as pa

    try:
        document = json.loads(location.read_text())
        embeddings = document["embeddings"]
        matrix = np.array(list(embeddings.values()), np.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"index {path}: expected pybioclip's {{\"model\", \"embeddings\": {{id: [floats]}}}} "
                         f"({type(e).__name__}: {e})") from None
    if matrix.ndim != 2 or not len(matrix):
        raise InputError(f"index {path}: expected embeddings of one dimension, got shape {matrix.shape}")
    table = pa.table({ID_COLUMN: list(embeddings), FILE_COLUMN: list(embeddings)})
    return _validated(Index(path, matrix, table, ID_COLUMN, document.get("model"),
                            files=[(location.name, _size(location))]))


def _id_column(path: str, names: list[str]) -> str:
    for name in ID_COLUMNS:
        if name in names:
            return name
    raise InputError(f"index {path}: no id column (expected {' or '.join(ID_COLUMNS)}; columns: {', '.join(names)})")


def _from_table(path: str, table, files, model=None, preprocess=None) -> Index:
    """Splits the `emb` list column into a matrix; the other columns stay a table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if EMB_COLUMN not in table.column_names:
        raise InputError(f"index {path}: no {EMB_COLUMN!r} column (columns: {', '.join(table.column_names)}); "
                         "is it an output of `embed`?")
    column = table.column(EMB_COLUMN)
    if not pa.types.is_list(column.type) and not pa.types.is_fixed_size_list(column.type):
        raise InputError(f"index {path}: column {EMB_COLUMN!r} is {column.type}, expected list<float32>")
    lengths = pc.list_value_length(column)
    low, high = pc.min_max(lengths).values()
    if column.null_count or low.as_py() != high.as_py() or not low.as_py():
        raise InputError(f"index {path}: column {EMB_COLUMN!r} has empty, missing or ragged rows "
                         f"(lengths {low.as_py()} to {high.as_py()}, {column.null_count} missing)")
    dim = low.as_py()
    dtype = np.float16 if pa.types.is_float16(column.type.value_type) else np.float32
    matrix = np.empty((len(column), dim), dtype)
    start = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        matrix[start:start + len(chunk)] = values.reshape(-1, dim)
        start += len(chunk)
    rest = table.drop_columns([EMB_COLUMN])
    return _validated(Index(path, matrix, rest, _id_column(path, rest.column_names), model, preprocess, files))


def _validated(index: Index) -> Index:
    """Ids are strings, each once (a query by id must name one row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    position = index.table.column_names.index(index.id_column)
    ids = pc.cast(index.table.column(index.id_column), pa.string())
    if ids.null_count:
        raise InputError(f"index {index.path}: column {index.id_column!r} has {ids.null_count} missing ids")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        raise InputError(f"index {index.path}: duplicate {index.id_column} {repeated!r}; ids must be unique")
    index.table = index.table.set_column(position, index.id_column, ids)
    return index


# --------------------------------------------------------------------------------------------------- searching
class Searcher:
    """Top-k cosine neighbours of query vectors among an index's rows: exact on device, or through faiss.

    approximate: a faiss IVF index (nlist lists, nprobe of them searched per query; defaults from the index size),
    built once and saved beside the index. `self.report` says which search ran and, when approximate, its recall@10
    against exact search.
    """

    def __init__(self, index: Index, approximate: bool = False, nlist: int | None = None, nprobe: int | None = None,
                 progress: bool = True, dtype: Any = None):
        self.index, self.progress, self.dtype = index, progress, dtype
        self._bank = None
        if approximate:
            from bioclip_jax.inference import ann

            self._faiss, self.report = ann.open_index(index, self.exact_top_k, nlist, nprobe, progress)
        else:
            self._faiss, self.report = None, {"search": "exact", "rows": len(index)}

    def bank(self):
        """The index on device (this host's devices share its rows), made on first use."""
        if self._bank is None:
            import jax
            import jax.numpy as jnp
            from jax.sharding import Mesh

            from bioclip_jax.inference.topk import DeviceBank

            # bf16 halves accelerator memory; XLA's CPU backend multiplies float32 faster than bf16
            dtype = self.dtype or (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
            mesh = Mesh(np.array(jax.local_devices()), ("index",))
            self._bank = DeviceBank(self.index.embeddings, mesh=mesh, dtype=dtype)
        return self._bank

    def exact_top_k(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.bank().top_k(vectors, k)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores [Q, k] (cosine, best first) and index rows [Q, k]; -1 rows (faiss found fewer) score -inf."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.index.dim:
            raise InputError(f"index {self.index.path} holds {self.index.dim}-d embeddings; the queries are "
                             f"{vectors.shape[-1]}-d (made with another model?)")
        if self._faiss is None:
            return self.exact_top_k(vectors, k)
        from bioclip_jax.inference import ann

        return ann.search(self._faiss, vectors, k)


# ----------------------------------------------------------------------------------------------------- queries
@dataclasses.dataclass
class Queries:
    """What was asked (a text, an image path, or id:ID), its vector, and the index row to leave out (an id query's
    own row: an item is not its own neighbour)."""

    labels: list[str]
    vectors: np.ndarray
    exclude: list[int | None]


def encode_queries(index: Index, texts=(), images=(), ids=(), model=None, arch: str | None = None,
                   batch_size: int = 32) -> Queries:
    """Query vectors: texts and images encoded with `model` (a Model, a path or hub name; default: the model the
    index records), ids looked up in the index."""
    texts, images, ids = list(texts), list(images), list(ids)
    if not (texts or images or ids):
        raise InputError("search needs a query: --text, --image or --id")
    vectors, labels, exclude = [], [], []
    if texts or images:
        loaded = _query_model(index, model, arch)
        from bioclip_jax.inference.model import encode

        if texts:
            vectors.append(encode(loaded, texts=texts, batch_size=batch_size))
            labels += texts
        if images:
            vectors.append(encode(loaded, images=images, batch_size=batch_size, preprocess=_preprocess(index)))
            labels += [os.fspath(i) for i in images]
        exclude += [None] * (len(texts) + len(images))
    if ids:
        rows = index.rows_of(ids)
        vectors.append(np.asarray(index.embeddings[rows], np.float32))
        labels += [f"{index.id_column}:{i}" for i in ids]
        exclude += rows
    return Queries(labels, np.concatenate(vectors), exclude)


def _query_model(index: Index, model, arch: str | None):
    from bioclip_jax.inference.model import Model, load

    if model is None and not index.model:
        raise InputError(f"index {index.path}: records no model (only embed's Parquet folders and JSON do); "
                         "pass --model, the model that embedded it")
    loaded = model if isinstance(model, Model) else load(model or index.model, model=arch)
    if loaded.config.embed_dim != index.dim:
        raise InputError(f"index {index.path} holds {index.dim}-d embeddings; model {loaded.source or model} "
                         f"embeds to {loaded.config.embed_dim}-d (it was embedded with another model)")
    return loaded


def _preprocess(index: Index):
    """The preprocessing embed used for the index's images (its manifest's), else pybioclip's default."""
    from bioclip_jax.data.transforms import Preprocess

    if not index.preprocess:
        return "pybioclip"
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in index.preprocess.items()}
    return Preprocess(**fields)


def search(index: Index, queries: Queries, k: int, searcher: Searcher | None = None) -> list[dict]:
    """Result rows, best first per query: query, rank, score, then the index row's columns (id, file_name,
    carried columns)."""
    if k < 1:
        raise InputError(f"-k {k}: expected at least 1 neighbour")
    searcher = searcher or Searcher(index)
    extra = int(any(e is not None for e in queries.exclude))
    scores, rows = searcher.search(queries.vectors, min(k + extra, len(index)))
    out = []
    for label, own, q_scores, q_rows in zip(queries.labels, queries.exclude, scores, rows):
        hits = [(float(s), int(r)) for s, r in zip(q_scores, q_rows) if r >= 0 and r != own][:k]
        columns = index.table.take([r for _, r in hits]).to_pylist()
        out += [{"query": label, "rank": rank + 1, "score": s, **c} for rank, ((s, _), c) in enumerate(zip(hits,
                                                                                                        columns))]
    return out


def run_search(index_path: str | os.PathLike, texts=(), images=(), ids=(), k: int = 10, model=None,
               arch: str | None = None, approximate: bool = False, nlist: int | None = None,
               nprobe: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """`bioclip-jax search`: reads the index, encodes the queries, searches -> (result rows, the searcher's report)."""
    index = read_index(index_path)
    queries = encode_queries(index, texts, images, ids, model, arch)
    searcher = Searcher(index, approximate, nlist, nprobe, progress)
    return search(index, queries, k, searcher), searcher.report


def describe(report: dict) -> str:
    """The searcher's report in one line: which search, and an approximate index's recall@10 against exact."""
    if report["search"] == "exact":
        return f"exact search over {report['rows']} rows"
    where = f"saved in {report['saved']}" if report["saved"] else "not saved: the index's folder is not writable"
    return (f"faiss {report['factory']} over {report['rows']} rows ({'built' if report['built'] else 'reused'}, "
            f"{where}), nprobe {report['nprobe']}: recall@10 {report['recall_at_10']:.3f} against exact search "
            f"on {report['recall_queries']} queries from the index")


def format_results(rows: list[dict], fmt: str) -> str:
    """Result rows as a bordered table, CSV or JSON (a list of objects)."""
    from bioclip_jax.inference.io import format_rows

    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    columns = list(dict.fromkeys(c for r in rows for c in r)) or ["query", "rank", "score"]
    return format_rows([{c: r.get(c, "") for c in columns} for r in rows], fmt, columns)
