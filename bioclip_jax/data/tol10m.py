"""TreeOfLife-10M as published on Hugging Face (imageomics/TreeOfLife-10M): tars of `<treeoflife_id>.jpg` members
(`dataset/EOL/image_set_01..63.tar.gz`) and a catalog with one row per image (`metadata/catalog.csv`, or a Parquet
catalog with the same columns such as TreeOfLife-200M's `catalog.parquet`). Input side only: the catalog is read in
column batches with pyarrow (only the columns needed, never one Python object per row), tars as streams (gzip cannot
seek); planning and writing live in writers.py. See docs/data_format.md.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
import re
import tarfile
import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from bioclip_jax.data.sources import IMAGE_EXTS, Skip, describe, row_taxon
from bioclip_jax.data.taxonomy import RANKS, Taxon
from bioclip_jax.errors import InputError

ID = "treeoflife_id"
SPLIT = "split"
# The catalog's name of each rank (metadata.csv files say `cls`), then the common name; first match wins.
RANK_COLUMNS = {rank: ("class", "cls") if rank == "class" else (rank,) for rank in RANKS}
COMMON_COLUMNS = ("common", "common_name")
DEFAULT_SPLIT = "train"  # for a catalog without a split column
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Cells that mean "unknown" in catalogs written by pandas or R: they become "" ranks.
NAN_LIKE = pa.array(["nan", "none", "null", "na", "n/a", "<na>"])
FIELDS = ("id", SPLIT, *RANKS, "common")  # the normalised column names of every catalog batch
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Where a catalog's columns are: `columns` maps each of FIELDS to its column in the file (None: absent)."""
    path: str
    parquet: bool
    columns: dict

    @property
    def missing_optional(self) -> list[str]:
        return [f for f in (SPLIT, "common") if self.columns[f] is None]


def open_catalog(path: str) -> Catalog:
    """Checks a catalog's header (CSV, or Parquet by its suffix); raises one line naming the file and the missing
    columns."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no catalog at {path!r}")
    parquet = path.lower().endswith((".parquet", ".pq"))
    if parquet:
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except pa.ArrowException as e:
            raise InputError(f"{path}: not a readable Parquet catalog ({str(e).splitlines()[0]})") from None
    else:
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            names = next(csv.reader(f), [])
    stripped = {n.strip(): n for n in names}
    pick = lambda options: next((stripped[o] for o in options if o in stripped), None)  # noqa: E731
    columns = {"id": pick((ID,)), SPLIT: pick((SPLIT,)), "common": pick(COMMON_COLUMNS),
               **{rank: pick(RANK_COLUMNS[rank]) for rank in RANKS}}
    missing = [ID if f == "id" else "/".join(RANK_COLUMNS[f]) for f in ("id", *RANKS) if columns[f] is None]
    if missing:
        raise InputError(f"{path}: missing catalog column(s) {', '.join(missing)} (found: "
                         f"{', '.join(stripped) or 'none'}; expected {ID}, {', '.join(RANKS)}, optional "
                         f"{SPLIT}, common)")
    return Catalog(path, parquet, columns)


def _clean(arr: pa.Array) -> pa.Array:
    """Any column -> trimmed strings, with nulls and NaN-like cells as ""."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    arr = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()).fill_null(""))
    return pc.if_else(pc.is_in(pc.utf8_lower(arr), value_set=NAN_LIKE), "", arr)


def _clean_encoded(arr: pa.Array) -> pa.DictionaryArray:
    """Like _clean, dictionary-encoded: the cleaning runs on the distinct values only (ranks repeat a lot, which is
    also why 10M rows of them stay small)."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    encoded = pc.dictionary_encode(pc.cast(arr, pa.string()).fill_null(""))
    return pa.DictionaryArray.from_arrays(encoded.indices, _clean(encoded.dictionary))


def _normalise(catalog: Catalog, batch: pa.RecordBatch) -> pa.Table:
    """A batch of the file -> the FIELDS columns: the id as strings, the rest dictionary-encoded."""
    n = batch.num_rows
    arrays = []
    for field in FIELDS:
        name = catalog.columns[field]
        if name is None:
            arr = pc.dictionary_encode(pa.array([DEFAULT_SPLIT if field == SPLIT else ""] * n, pa.string()))
        else:
            arr = (_clean if field == "id" else _clean_encoded)(batch.column(name))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=list(FIELDS))


class _CountingFile:
    """A binary file that advances a progress bar by the bytes read (pyarrow's CSV reader pulls from it)."""

    def __init__(self, path: str, bar):
        self._f, self._bar = open(path, "rb"), bar
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()
        self.closed = True


def iter_catalog(catalog: Catalog, verbose: bool = True) -> Iterator[pa.Table]:
    """The catalog in batches of normalised FIELDS columns (about 16 MB of file each), with a progress bar."""
    wanted = [c for c in catalog.columns.values() if c is not None]
    try:
        if catalog.parquet:
            import pyarrow.parquet as pq

            f = pq.ParquetFile(catalog.path)
            with tqdm(total=f.metadata.num_rows, unit="row", desc="reading catalog", disable=not verbose) as bar:
                for batch in f.iter_batches(batch_size=1 << 19, columns=wanted):
                    bar.update(batch.num_rows)
                    yield _normalise(catalog, batch)
            return
        import pyarrow.csv as pcsv

        size = os.path.getsize(catalog.path)
        with tqdm(total=size, unit="B", unit_scale=True, desc="reading catalog", disable=not verbose) as bar:
            stream = _CountingFile(catalog.path, bar)
            try:
                reader = pcsv.open_csv(
                    stream, read_options=pcsv.ReadOptions(block_size=16 << 20),
                    convert_options=pcsv.ConvertOptions(include_columns=wanted,
                                                        column_types={c: pa.string() for c in wanted}))
                for batch in reader:
                    yield _normalise(catalog, batch)
            finally:
                stream.close()
    except pa.ArrowException as e:  # e.g. a row with the wrong number of cells
        raise InputError(f"{catalog.path}: unreadable catalog ({str(e).splitlines()[0]})") from None


def catalog_taxon(row: dict) -> Taxon:
    """A catalog row (FIELDS keys) -> Taxon, with the rules of BioCLIP's metadata.csv rows: `species` may be the
    epithet or a binomial, a common name equal to the scientific or taxonomic name is dropped."""
    return row_taxon({"cls": row["class"], "common_name": row["common"],
                      **{rank: row[rank] for rank in RANKS if rank != "class"}})


# ----------------------------------------------------------------------------------------------------- tars


def image_id(member: str) -> str:
    """"image_set_01/0a1b....jpg" -> "0a1b...": the file name's stem is the treeoflife_id."""
    return posixpath.splitext(posixpath.basename(member))[0]


def _image_members(tf: tarfile.TarFile) -> Iterator[tuple[int, tarfile.TarInfo]]:
    """(ordinal, member) of every image file, in file order: the same numbering in the index and the write pass."""
    ordinal = 0
    for member in tf:
        if member.isfile() and posixpath.splitext(member.name)[1][1:].lower() in IMAGE_EXTS:
            yield ordinal, member
            ordinal += 1


def list_tar_images(path: str) -> tuple[list[str], list[dict]]:
    """One streamed pass over a tar (gzip or not) -> its image member names in order, and input-level errors (a
    damaged tar keeps what was read before the damage)."""
    names: list[str] = []
    errors: list[dict] = []
    try:
        with tarfile.open(path, "r|*") as tf:
            names.extend(member.name for _, member in _image_members(tf))
    except _TAR_ERRORS as e:
        errors.append({"name": path, "reason": "unreadable tar", "detail": describe(e)})
    return names, errors


def iter_tar_images(path: str, wanted) -> Iterator[tuple[int, str, bytes | Skip]]:
    """Streams a tar once -> (ordinal, member name, its bytes or the Skip why not) for the wanted ordinals, in file
    order. Stops quietly where the tar is damaged (the index pass reported it)."""
    wanted = set(wanted)
    try:
        with tarfile.open(path, "r|*") as tf:
            for ordinal, member in _image_members(tf):
                if ordinal not in wanted:
                    continue
                try:
                    data: bytes | Skip = tf.extractfile(member).read()
                except _TAR_ERRORS as e:
                    data = Skip("truncated member", describe(e))
                yield ordinal, member.name, data
                wanted.discard(ordinal)
                if not wanted:
                    return
    except _TAR_ERRORS:
        return


# ----------------------------------------------------------------------------------------------------- join

FIRST = 20  # how many ids the summary lists for each kind of mismatch
PROBE_ROWS = 1 << 22  # catalog rows matched against the image ids at once (about 300 MB, dictionary-encoded)
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _mismatch(count: int, first: list[str]) -> dict:
    return {"count": int(count), "first": first[:FIRST]}


class _Mismatches:
    """Counts names and keeps the first FIRST (a wrong catalog must not fill the memory with millions of names)."""

    def __init__(self):
        self.count, self.first = 0, []

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.first) < FIRST:
            self.first.append(name)

    def summary(self) -> dict:
        return _mismatch(self.count, self.first)


def join(catalog: Catalog, tars: list[str], names: list[list[str]], plan_paths: list[str],
         verbose: bool = True) -> tuple[list[dict[str, int]], dict[str, list[dict]], dict]:
    """Joins every tar's image members (names, in file order) to the catalog rows by treeoflife_id, and writes each
    tar's plan to plan_paths[k]: its placed images in file order (ordinal among the tar's images, member name,
    catalog FIELDS). An image is placed when it has a row with a split and its id was not met before (a repeated id
    is a `duplicate id` skip of its row's split). Catalog rows are streamed and only those of an image kept, so the
    memory follows the images, not the catalog.
    -> (per tar {split: placed images}, {split: duplicate skips}, the `catalog` section of the summary)."""
    image_ids = pa.chunked_array([pa.array([image_id(n) for n in tar_names], pa.string()) for tar_names in names],
                                 pa.string())
    value_set = image_ids.combine_chunks()
    kept, pending, rows, orphans = [], [], 0, _Mismatches()

    def probe() -> None:  # one hash table of the image ids per PROBE_ROWS catalog rows, not one per file block
        batch = pa.concat_tables(pending)
        pending.clear()
        has_image = pc.is_in(batch["id"], value_set=value_set)
        kept.append(batch.filter(has_image))
        missing = batch["id"].filter(pc.invert(has_image))
        orphans.count += len(missing)
        orphans.first += missing.slice(0, max(0, FIRST - len(orphans.first))).to_pylist()

    for batch in iter_catalog(catalog, verbose):
        pending.append(batch)
        rows += batch.num_rows
        if sum(b.num_rows for b in pending) >= PROBE_ROWS:
            probe()
    if pending:
        probe()
    table = pa.concat_tables(kept).combine_chunks() if kept else _normalise(
        catalog, pa.RecordBatch.from_pylist([], pa.schema([(c, pa.string()) for c in catalog.columns.values()
                                                          if c is not None])))
    row_of = pc.index_in(value_set, value_set=table["id"]).fill_null(-1).to_numpy()  # first row of a repeated id
    # Splits as small integer codes (not one Python string per image); -1: no row.
    encoded = pc.dictionary_encode(pc.cast(table["split"], pa.string()).combine_chunks())
    split_names, codes = encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False)
    split_of = np.where(row_of >= 0, codes[np.maximum(row_of, 0)] if len(codes) else -1, -1)
    no_split = split_names.index("") if "" in split_names else -2
    matched = np.flatnonzero(row_of >= 0)
    first_time = np.zeros(len(row_of), bool)
    first_time[matched[np.unique(row_of[matched], return_index=True)[1]]] = True
    placed = first_time & (split_of != no_split)
    bad = [split_names[c] for c in np.unique(split_of[placed]) if not _SPLIT_NAME.fullmatch(split_names[c])]
    if bad:
        raise InputError(f"{catalog.path}: split value(s) {', '.join(map(repr, bad[:5]))} cannot name an output "
                         f"folder (expected letters, digits, '_', '.', '-')")

    counts: list[dict[str, int]] = []
    duplicates: dict[str, list[dict]] = collections.defaultdict(list)
    without_row, without_split = _Mismatches(), _Mismatches()
    start = 0
    for tar, tar_names, plan_path in zip(tars, names, plan_paths):
        at = slice(start, start + len(tar_names))
        start += len(tar_names)
        rows_here, splits_here, first_here = row_of[at], split_of[at], first_time[at]
        for j in np.flatnonzero(rows_here < 0):
            without_row.add(f"{tar}:{tar_names[j]}")
        for j in np.flatnonzero((rows_here >= 0) & ~first_here):
            duplicates[split_names[splits_here[j]]].append(
                {"name": f"{tar}:{tar_names[j]}", "reason": "duplicate id", "detail": ""})
        for j in np.flatnonzero(first_here & (splits_here == no_split)):
            without_split.add(f"{tar}:{tar_names[j]}")
        keep = np.flatnonzero(placed[at])
        plan = table.take(pa.array(rows_here[keep]))
        plan = pa.Table.from_arrays(
            [pa.array(keep, pa.int64()), pa.array([tar_names[j] for j in keep], pa.string())]
            + [pc.cast(c, pa.string()).combine_chunks() for c in plan.columns],
            names=["ordinal", "member", *plan.column_names])
        _write_table(plan_path, plan)
        counts.append({split_names[c]: int(n) for c, n in zip(*np.unique(splits_here[keep], return_counts=True))})

    repeated = pc.value_counts(table["id"])
    repeated = repeated.filter(pc.greater(repeated.field("counts"), 1))
    info = {"file": catalog.path, "rows": rows, "absent_columns": catalog.missing_optional,
            "images": len(row_of),
            "images_without_row": without_row.summary(),
            "rows_without_image": orphans.summary(),
            "images_without_split": without_split.summary(),
            "duplicate_row_ids": _mismatch(sum(repeated.field("counts").to_pylist()) - len(repeated),
                                           repeated.field("values").slice(0, FIRST).to_pylist())}
    return counts, dict(duplicates), info


def describe_join(info: dict) -> str:
    """The catalog section of a summary as one line."""
    def part(key: str, what: str) -> str:
        item = info[key]
        first = ", ".join(item["first"][:3]) + (", ..." if item["count"] > 3 else "")
        return f"; {item['count']} {what}" + (f" ({first})" if item["count"] else "")

    line = (f"catalog {info['file']}: {info['rows']} rows, {info['images']} images"
            + part("images_without_row", "image(s) without a row")
            + part("rows_without_image", "row(s) without an image"))
    if info["images_without_split"]["count"]:
        line += part("images_without_split", "image(s) whose row has no split")
    if info["duplicate_row_ids"]["count"]:
        line += part("duplicate_row_ids", "repeated row(s) ignored")
    if SPLIT in info["absent_columns"]:
        line += f"; no {SPLIT} column: every image in {DEFAULT_SPLIT}"
    return line


def _write_table(path: str, table: pa.Table) -> None:
    tmp = f"{path}.tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_plan(path: str) -> dict[str, list[dict]]:
    """A tar's plan file -> {split: its rows in file order} (one tar: small enough for Python rows)."""
    with pa.memory_map(path) as source:
        rows = pa.ipc.open_file(source).read_all().to_pylist()
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_split[row[SPLIT]].append(row)
    return dict(by_split)
