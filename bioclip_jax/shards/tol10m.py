"""TreeOfLife-10M as published on Hugging Face (imageomics/TreeOfLife-10M): tars of `<treeoflife_id>.jpg` members
(`dataset/EOL/image_set_01..63.tar.gz`) and a catalog with one row per image (`metadata/catalog.csv`, or a Parquet
catalog with the same columns such as TreeOfLife-200M's `catalog.parquet`). The catalog is read in
column batches with pyarrow (only the columns needed, never one Python object per row), tars as streams (gzip cannot
seek). The `TreeOfLife10M` source plans a tar as one unit of work. See docs/data_format.md.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
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

from bioclip_jax.data.taxonomy import RANKS, Taxon, row_taxon
from bioclip_jax.errors import InputError, first_line
from bioclip_jax.shards.build import Example, Skip, describe
from bioclip_jax.shards.output import Shard
from bioclip_jax.shards.pool import map_ordered
from bioclip_jax.shards.source import Plan, Source
from bioclip_jax.shards.treeoflife import IMAGE_EXTS, find_tars

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


def open_catalog(path: str, id_column: str = ID) -> Catalog:
    """Checks a catalog's header (CSV, or Parquet by its suffix); raises one line naming the file and the missing
    columns. `id_column`: the image id's column (TreeOfLife-10M: treeoflife_id; TreeOfLife-200M: uuid)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no catalog at {path!r}")
    parquet = path.lower().endswith((".parquet", ".pq"))
    if parquet:
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except pa.ArrowException as e:
            raise InputError(f"{path}: not a readable Parquet catalog ({first_line(e)})") from None
    else:
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            names = next(csv.reader(f), [])
    return catalog_columns(path, names, parquet, id_column)


def catalog_columns(path: str, names: list[str], parquet: bool, id_column: str = ID) -> Catalog:
    """A catalog's column names -> where each of FIELDS is; one line naming the file and the missing columns."""
    stripped = {n.strip(): n for n in names}
    pick = lambda options: next((stripped[o] for o in options if o in stripped), None)  # noqa: E731
    columns = {"id": pick((id_column,)), SPLIT: pick((SPLIT,)), "common": pick(COMMON_COLUMNS),
               **{rank: pick(RANK_COLUMNS[rank]) for rank in RANKS}}
    missing = [id_column if f == "id" else "/".join(RANK_COLUMNS[f]) for f in ("id", *RANKS) if columns[f] is None]
    if missing:
        raise InputError(f"{path}: missing catalog column(s) {', '.join(missing)} (found: "
                         f"{', '.join(stripped) or 'none'}; expected {id_column}, {', '.join(RANKS)}, optional "
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


def normalise(catalog: Catalog, batch: pa.RecordBatch) -> pa.Table:
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
                    yield normalise(catalog, batch)
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
                    yield normalise(catalog, batch)
            finally:
                stream.close()
    except pa.ArrowException as e:  # e.g. a row with the wrong number of cells
        raise InputError(f"{catalog.path}: unreadable catalog ({first_line(e)})") from None


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


def _rows_with_image(catalog: Catalog, value_set: pa.Array, verbose: bool) -> tuple[pa.Table, int, _Mismatches]:
    """Streams the catalog and keeps only the rows of an image, so the memory follows the images, not the catalog
    -> (those rows, the catalog's row count, the rows without an image)."""
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
    if kept:
        return pa.concat_tables(kept).combine_chunks(), rows, orphans
    empty = pa.RecordBatch.from_pylist([], pa.schema([(c, pa.string()) for c in catalog.columns.values()
                                                      if c is not None]))
    return normalise(catalog, empty), rows, orphans


@dataclasses.dataclass
class _Placement:
    """Where each image (every tar's images, in order) goes: `row_of` its catalog row (the first of a repeated id;
    -1: none), `split_of` that row's split as a code into `split_names` (-1: no row), `first_time` whether it is the
    first image of its id, `placed` whether it is written (first time, and a split)."""
    row_of: np.ndarray
    split_of: np.ndarray
    first_time: np.ndarray
    placed: np.ndarray
    split_names: list[str]
    no_split: int  # the code of the empty split ("" in the catalog), or -2

    def at(self, at: slice) -> "_Placement":
        return _Placement(self.row_of[at], self.split_of[at], self.first_time[at], self.placed[at], self.split_names,
                          self.no_split)


def _place(catalog: Catalog, table: pa.Table, value_set: pa.Array) -> _Placement:
    row_of = pc.index_in(value_set, value_set=table["id"]).fill_null(-1).to_numpy()
    # Splits as small integer codes (not one Python string per image).
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
    return _Placement(row_of, split_of, first_time, placed, split_names, no_split)


class _JoinReport:
    """The images the join could not place, by why."""

    def __init__(self):
        self.without_row, self.without_split = _Mismatches(), _Mismatches()
        self.duplicates: dict[str, list[dict]] = collections.defaultdict(list)

    def add_tar(self, tar: str, names: list[str], p: _Placement) -> None:
        for j in np.flatnonzero(p.row_of < 0):
            self.without_row.add(f"{tar}:{names[j]}")
        for j in np.flatnonzero((p.row_of >= 0) & ~p.first_time):
            self.duplicates[p.split_names[p.split_of[j]]].append(
                {"name": f"{tar}:{names[j]}", "reason": "duplicate id", "detail": ""})
        for j in np.flatnonzero(p.first_time & (p.split_of == p.no_split)):
            self.without_split.add(f"{tar}:{names[j]}")


def _write_tar_plan(path: str, names: list[str], p: _Placement, table: pa.Table) -> dict[str, int]:
    """One tar's plan file: its placed images in file order (ordinal among the tar's images, member name, catalog
    FIELDS) -> {split: placed images}."""
    keep = np.flatnonzero(p.placed)
    rows = table.take(pa.array(p.row_of[keep]))
    plan = pa.Table.from_arrays(
        [pa.array(keep, pa.int64()), pa.array([names[j] for j in keep], pa.string())]
        + [pc.cast(c, pa.string()).combine_chunks() for c in rows.columns],
        names=["ordinal", "member", *rows.column_names])
    _write_table(path, plan)
    return {p.split_names[c]: int(n) for c, n in zip(*np.unique(p.split_of[keep], return_counts=True))}


def join(catalog: Catalog, tars: list[str], names: list[list[str]], plan_paths: list[str],
         verbose: bool = True) -> tuple[list[dict[str, int]], dict[str, list[dict]], dict]:
    """Joins every tar's image members (names, in file order) to the catalog rows by treeoflife_id, and writes each
    tar's plan to plan_paths[k] (`_write_tar_plan`). An image is placed when it has a row with a split and its id was
    not met before (a repeated id is a `duplicate id` skip of its row's split).
    -> (per tar {split: placed images}, {split: duplicate skips}, the `catalog` section of the summary)."""
    image_ids = pa.chunked_array([pa.array([image_id(n) for n in tar_names], pa.string()) for tar_names in names],
                                 pa.string())
    value_set = image_ids.combine_chunks()
    table, rows, orphans = _rows_with_image(catalog, value_set, verbose)
    placement = _place(catalog, table, value_set)
    report, counts, start = _JoinReport(), [], 0
    for tar, tar_names, plan_path in zip(tars, names, plan_paths):
        here = placement.at(slice(start, start + len(tar_names)))
        start += len(tar_names)
        report.add_tar(tar, tar_names, here)
        counts.append(_write_tar_plan(plan_path, tar_names, here, table))
    repeated = pc.value_counts(table["id"])
    repeated = repeated.filter(pc.greater(repeated.field("counts"), 1))
    info = {"file": catalog.path, "rows": rows, "absent_columns": catalog.missing_optional,
            "images": len(placement.row_of),
            "images_without_row": report.without_row.summary(),
            "rows_without_image": orphans.summary(),
            "images_without_split": report.without_split.summary(),
            "duplicate_row_ids": _mismatch(sum(repeated.field("counts").to_pylist()) - len(repeated),
                                           repeated.field("values").slice(0, FIRST).to_pylist())}
    return counts, dict(report.duplicates), info


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


def _file_sha256(path: str) -> str:
    """An edited catalog is another plan (read in blocks: the published catalog is several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _list_tar(path: str, progress) -> tuple[list[str], list[dict]]:
    result = list_tar_images(path)
    progress(1)
    return result


class TreeOfLife10M(Source):
    """Tars of `<treeoflife_id>.jpg` (gzip or not) plus catalog.csv or a Parquet catalog with the same columns
    -> OUT/<split>/ shards, the split being the catalog's. The summary's `catalog` section names the images without
    a row and the rows without an image.

    Gzip tars cannot seek, so a tar is a unit of work: one worker streams it once and fills all its shards. A shard
    never spans two tars (a tar is a plan group), so each tar's shards are numbered in the plan before any is
    written, and a rerun streams only the tars with unfinished shards."""

    name = "tol10m"

    def __init__(self, catalog: str, images: str | list[str]):
        self.catalog, self.images = str(catalog), images
        self.tars: list[str] = []
        self.plan_paths: list[str] = []
        self._columns: Catalog | None = None

    def settings(self) -> dict:
        self._columns = open_catalog(self.catalog)  # a bad header fails before the long passes over the tars
        self.tars = find_tars(self.images, suffixes=TAR_SUFFIXES)
        return {"inputs": [[t, os.path.getsize(t)] for t in self.tars],
                "catalog": [os.path.abspath(self._columns.path), _file_sha256(self._columns.path)]}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        with tqdm(total=len(self.tars), unit="tar", desc="indexing tars", disable=not progress) as bar:
            indexed = map_ordered(_list_tar, self.tars, workers, bar)
        plans = os.path.join(out, ".plan")
        os.makedirs(plans, exist_ok=True)
        self.plan_paths = [os.path.join(plans, f"{k:05d}.arrow") for k in range(len(self.tars))]
        input_errors = [e for _, errors in indexed for e in errors]
        names = [tar_names for tar_names, _ in indexed]
        del indexed
        counts, duplicates, info = join(self._columns, self.tars, names, self.plan_paths, progress)
        self._columns = None
        groups = {split: [range(c.get(split, 0)) for c in counts]  # items: indices into a tar's rows of the split
                  for split in sorted({s for c in counts for s in c} | set(duplicates))}
        return Plan(groups, duplicates, input_errors, {"catalog": info}, scratch=[plans])

    def jobs(self, shards: list[Shard]) -> list[list[Shard]]:
        by_tar: dict[int, list[Shard]] = {}
        for shard in shards:
            by_tar.setdefault(shard.group, []).append(shard)
        return list(by_tar.values())

    def read(self, shards: list[Shard]) -> Iterator[tuple[int, str, Example | Skip]]:
        """One streamed pass over the tar of these shards (all of one tar)."""
        tar, plan = self.tars[shards[0].group], read_plan(self.plan_paths[shards[0].group])
        wanted = {plan[s.split][i]["ordinal"]: (k, plan[s.split][i]) for k, s in enumerate(shards) for i in s.items}

        def not_reached():  # what the stream never yielded: the tar ended (damaged) before these members
            for ordinal in sorted(wanted):
                yield ordinal, Skip("missing image", "the tar ended before this member")

        streamed = ((ordinal, data) for ordinal, _, data in iter_tar_images(tar, wanted))
        for ordinal, data in itertools.chain(streamed, not_reached()):
            k, row = wanted.pop(ordinal)
            yield k, f"{tar}:{row['member']}", _example(row, data)

    def notes(self, summary: dict) -> list[str]:
        return [describe_join(summary["catalog"])]


def _example(row: dict, data: bytes | Skip) -> Example | Skip:
    if isinstance(data, Skip):
        return data
    taxon = catalog_taxon(row)
    if taxon.empty and not taxon.common_name:
        return Skip("no taxonomy")
    return Example(row["id"], data, taxon)
