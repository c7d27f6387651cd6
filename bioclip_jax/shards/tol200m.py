"""TreeOfLife-200M as published (imageomics/TreeOfLife-200M): `dataset/catalog.parquet`, one row per image keyed by
`uuid` with `kingdom` ... `species` and `common`, and the images, which the dataset does not ship: they are fetched
from the providers (GBIF, EOL, BIOSCAN-5M, FathomNet) with Imageomics' distributed-downloader, whose output is Parquet
files with one row per image: `uuid`, `image` (bytes) and, where it stored decoded pixels, `resized_size` (see
docs/data_format.md).

Both writers of these records, make-shards' process pool (`TreeOfLife200M`) and the Apache Beam pipeline
(`shards.beam`), go through the functions here and `build_record`, so they write the same bytes:
- `shuffle_key`, `shard_of`: where a uuid goes. The published data is grouped by taxon; records are placed by a hash
  of (seed, uuid), range-partitioned into `num_shards` shards and sorted by it within one, so no shard holds one taxon;
- `outcomes`: a uuid's catalog rows and images -> its sample (an Example, or the Skip saying why not), then one
  `duplicate id` skip per extra row or image.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import math
import os
from typing import Iterator

import pyarrow as pa
from etils import epath
from PIL import Image
from tqdm.auto import tqdm

from bioclip_jax.errors import InputError, first_line
from bioclip_jax.paths import is_url
from bioclip_jax.shards.build import Example, Skip
from bioclip_jax.shards.output import Shard
from bioclip_jax.shards.source import Plan, Source
from bioclip_jax.shards.tol10m import Catalog, catalog_columns, catalog_taxon, iter_catalog, open_catalog
from bioclip_jax.shards.treeoflife import expand_braces

ID = "uuid"
IMAGE = "image"
SIZE = "resized_size"  # (height, width) of decoded BGR pixels, as distributed-downloader stores them
SPLIT = "train"  # TreeOfLife-200M is a training set: no split column, every record in train


def shuffle_key(seed: int, uuid: str) -> int:
    """A uuid's place in the output: stable across machines, runs and Python versions."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{uuid}".encode()).digest()[:8], "big")


def num_shards(catalog_rows: int, records_per_shard: int) -> int:
    return max(1, math.ceil(catalog_rows / records_per_shard))


def shard_of(key: int, shards: int) -> int:
    """Range partition of the key space: shard i holds the keys in [i, i + 1) * 2**64 / shards, so the shards in
    order, each sorted by key, are the whole output sorted by key."""
    return (key * shards) >> 64


# ----------------------------------------------------------------------------------------------------- inputs


def find_parquet(patterns: list[str] | str) -> list[str]:
    """Parquet files from files, folders (their *.parquet), globs and brace patterns, local or gs://, in the order
    given (sorted within a folder or glob)."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    found, missing = [], []
    for pattern in patterns:
        for p in expand_braces(str(pattern)):
            paths = _expand_url(p) if is_url(p) else _expand_local(p)
            if not paths:
                missing.append(p)
            found += [q for q in paths if q not in found]
    if missing:
        raise FileNotFoundError(f"no Parquet image files at {', '.join(repr(m) for m in missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return found


def _expand_local(p: str) -> list[str]:
    if os.path.isdir(p):
        return sorted(glob.glob(os.path.join(p, "*.parquet")))
    if glob.has_magic(p):
        return sorted(glob.glob(p))
    return [os.path.normpath(p)] if os.path.isfile(p) else []


def _expand_url(p: str) -> list[str]:
    if not glob.has_magic(p):
        path = epath.Path(p)
        return sorted(str(q) for q in path.glob("*.parquet")) if path.is_dir() else [p] if path.exists() else []
    head = p[:min(p.index(c) for c in "*?[" if c in p)]
    base = head[:head.rindex("/")]
    return sorted(str(q) for q in epath.Path(base).glob(p[len(base) + 1:]))


def file_size(path: str) -> int:
    return epath.Path(path).stat().length


def parquet_schema(path: str, what: str) -> tuple[list[str], int]:
    """A Parquet file's column names and row count, read from its footer; one line when it is not Parquet."""
    import pyarrow.parquet as pq

    try:
        with epath.Path(path).open("rb") as f:
            meta = pq.ParquetFile(f)
            return meta.schema_arrow.names, meta.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet {what} ({first_line(e)})") from None


def image_columns(path: str) -> list[str]:
    """The columns to read from an image file; one line naming the file when `uuid` or `image` is absent."""
    names, _ = parquet_schema(path, "image file")
    missing = [c for c in (ID, IMAGE) if c not in names]
    if missing:
        raise InputError(f"{path}: missing image column(s) {', '.join(missing)} (found: {', '.join(names) or 'none'}; "
                         f"expected {ID}, {IMAGE}, optional {SIZE}, as distributed-downloader writes them)")
    return [ID, IMAGE] + ([SIZE] if SIZE in names else [])


def check_catalog(path: str) -> tuple[Catalog, int]:
    """The catalog's columns (one line naming the file and what is missing) and its row count."""
    if is_url(path):  # open_catalog reads local files; a remote header is checked the same way from its footer
        names, rows = parquet_schema(path, "catalog")
        return catalog_columns(path, names, parquet=True, id_column=ID), rows
    catalog = open_catalog(path, id_column=ID)
    if not catalog.parquet:
        raise InputError(f"{path}: expected TreeOfLife-200M's catalog.parquet (a .parquet file)")
    return catalog, parquet_schema(path, "catalog")[1]


def catalog_rows(table: pa.Table) -> Iterator[tuple[str, dict]]:
    """A normalised catalog batch (tol10m.FIELDS columns) -> (uuid, row) of the rows with an id."""
    for row in table.to_pylist():
        if row["id"]:
            yield row["id"], row


def image_rows(table: pa.Table) -> Iterator[tuple[str, tuple]]:
    """A batch of an image file -> (uuid, (bytes, resized_size or None)), in file order."""
    sizes = table.column(SIZE).to_pylist() if SIZE in table.column_names else [None] * table.num_rows
    for uuid, data, size in zip(table.column(ID).to_pylist(), table.column(IMAGE).to_pylist(), sizes):
        if uuid:
            yield str(uuid), (data or b"", tuple(size) if size is not None else None)


def image_payload(data: bytes, size: tuple | None) -> bytes | Image.Image:
    """Encoded bytes as they are; distributed-downloader's decoded pixels (BGR, `resized_size` = (h, w)) as an image."""
    if size is not None and len(size) == 2 and len(data) == size[0] * size[1] * 3 > 0:
        b, g, r = Image.frombytes("RGB", (int(size[1]), int(size[0])), data).split()
        return Image.merge("RGB", (r, g, b))
    return data


# ----------------------------------------------------------------------------------------------------- one uuid


def _row_order(row: dict) -> tuple:
    return tuple(row.get(k) or "" for k in sorted(row))


def outcomes(uuid: str, rows: list[dict], images: list[tuple]) -> list[Example | Skip]:
    """Everything one uuid yields: its sample, then one `duplicate id` skip per extra catalog row or image. Which row
    and image are used does not depend on the order they arrive in (Beam gives no order): the first by content."""
    out: list[Example | Skip]
    if not rows:
        out = [Skip("image without row", "the catalog has no row for this uuid")]
    elif not images:
        out = [Skip("missing image", "no image file holds this uuid (not fetched from its provider)")]
    else:
        row = min(rows, key=_row_order)
        data, size = min(images, key=lambda im: (hashlib.sha256(im[0]).digest(), im[1] or ()))
        taxon = catalog_taxon(row)
        out = [Example(uuid, image_payload(data, size), taxon) if not taxon.empty or taxon.common_name
               else Skip("no taxonomy")]
    out += [Skip("duplicate id", f"{len(rows)} catalog rows, the first by content is used")] * max(len(rows) - 1, 0)
    out += [Skip("duplicate id", f"{len(images)} images, the first by content is used")] * max(len(images) - 1, 0)
    return out


def outcome_count(rows: int, images: int) -> int:
    return 1 + max(rows - 1, 0) + max(images - 1, 0)


# ----------------------------------------------------------------------------------------------------- local source


@dataclasses.dataclass(frozen=True)
class _Item:
    """One outcome of a uuid in a shard: `j` = 0 is its sample (which reads the images), j > 0 its duplicates."""
    key: int
    uuid: str
    j: int
    rows: tuple = ()
    refs: tuple = ()  # (image file index, row in that file)


class TreeOfLife200M(Source):
    """catalog.parquet + the downloaded image Parquet files -> OUT/train/ shards, shuffled across taxa (`shard_of`).
    The process pool's source, for what one machine can hold: the plan keeps every catalog row of an image in memory.
    Past that, `shards.beam.make_shards_beam` runs the same records on Apache Beam."""

    name = "tol200m"

    def __init__(self, catalog: str, images: str | list[str], *, records_per_shard: int = 10000, seed: int = 0):
        self.catalog, self.images = str(catalog), images
        self.records_per_shard, self.seed = records_per_shard, seed
        self.files: list[str] = []
        self.columns: list[list[str]] = []
        self.parsed_catalog: Catalog | None = None
        self.catalog_rows = 0

    def settings(self) -> dict:
        self.parsed_catalog, self.catalog_rows = check_catalog(self.catalog)
        self.files = find_parquet(self.images)
        self.columns = [image_columns(f) for f in self.files]
        other = next((f for f, c in zip(self.files, self.columns) if c != self.columns[0]), None)
        if other is not None:
            raise InputError(f"{other}: image columns {', '.join(self.columns[self.files.index(other)])} differ from "
                             f"{self.files[0]}'s ({', '.join(self.columns[0])}); every image file must have the same")
        return {"inputs": [[f, file_size(f)] for f in self.files], "catalog": [self.catalog, file_size(self.catalog)],
                "seed": self.seed}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        import pyarrow.parquet as pq

        rows: dict[str, list] = collections.defaultdict(list)
        for table in iter_catalog(self.parsed_catalog, progress):
            for uuid, row in catalog_rows(table):
                rows[uuid].append(row)
        refs: dict[str, list] = collections.defaultdict(list)
        for k, path in enumerate(tqdm(self.files, unit="file", desc="indexing images", disable=not progress)):
            with epath.Path(path).open("rb") as f:
                ids = pq.read_table(f, columns=[ID]).column(ID).to_pylist()
            for i, uuid in enumerate(ids):
                if uuid:
                    refs[str(uuid)].append((k, i))
        n = num_shards(self.catalog_rows, self.records_per_shard)
        buckets: list[list[_Item]] = [[] for _ in range(n)]
        for uuid in rows.keys() | refs.keys():
            key = shuffle_key(self.seed, uuid)
            r, m = tuple(rows.get(uuid, ())), tuple(refs.get(uuid, ()))
            buckets[shard_of(key, n)] += [_Item(key, uuid, j, r, m) for j in range(outcome_count(len(r), len(m)))]
        for bucket in buckets:
            bucket.sort(key=lambda it: (it.key, it.uuid, it.j))
        return Plan({SPLIT: buckets}, whole_groups=True)

    def read(self, shards: list[Shard]) -> Iterator[tuple[int, str, Example | Skip]]:
        import pyarrow.parquet as pq

        tables: dict[int, pa.Table] = {}
        for k, shard in enumerate(shards):
            current: list = []
            for item in shard.items:
                if item.j == 0:
                    for f, _ in item.refs:
                        if f not in tables:
                            with epath.Path(self.files[f]).open("rb") as fh:
                                tables[f] = pq.read_table(fh, columns=self.columns[f])
                    images = [next(image_rows(tables[f].slice(i, 1)))[1] for f, i in item.refs]
                    current = outcomes(item.uuid, list(item.rows), images)
                yield k, item.uuid, current[item.j]
