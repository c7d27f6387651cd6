"""What `embed` and `predict` read: image files, quoted globs (recursive `**`), folders (recursive), listings of paths
(.txt, .csv, .parquet) whose other columns travel to the output, the ArrayRecord shards make-shards writes, and gs://
prefixes. Every host expands the same inputs in the same order, then reads only the images of its own parts.

    inputs = collect_inputs(["photos/", "more/**/*.jpg", "list.csv", "gs://bucket/shards/"])
    image, item_id, columns = inputs.load(0)     # decoded PIL image, its id, the carried columns of that item

Ids: a listing's `uuid` (or `id`) column, a shard record's id, otherwise the path as given. Duplicate ids are refused.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Any, Sequence

from bioclip_jax import paths
from bioclip_jax.data.records import SHARD_SUFFIX, Unreadable, decode_record, open_shards
from bioclip_jax.data.transforms import decode_image, load_image
from bioclip_jax.errors import InputError
from bioclip_jax.inference.outputs import EMB_COLUMN, FILE_COLUMN, ID_COLUMN, ID_COLUMNS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LISTING_SUFFIXES = (".txt", ".csv", ".parquet")
# A listing's path column: the first of these names present (case-insensitive).
PATH_COLUMNS = ("path", "file_path", "filepath", "image_path", "img_path", "file_name", "filename", "image")
RECORD_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name")
_GLOB_CHARS = "*?["


@dataclasses.dataclass
class Inputs:
    """Items in a fixed order: first the image paths (`refs`, their `ids` and carried `columns`, a value per path),
    then every record of `shards` (ids and taxonomy read with the image), without a Python object per record."""

    refs: list[str] = dataclasses.field(default_factory=list)
    ids: list[str] = dataclasses.field(default_factory=list)
    columns: dict[str, list] = dataclasses.field(default_factory=dict)
    shard_paths: list[str] = dataclasses.field(default_factory=list)
    shards: Any = None

    def __len__(self) -> int:
        return len(self.refs) + (len(self.shards) if self.shards is not None else 0)

    @property
    def column_names(self) -> list[str]:
        """The carried columns, in order: the listings' columns, then the taxonomy of shard records."""
        return list(self.columns) + ([c for c in RECORD_COLUMNS if c not in self.columns] if self.shard_paths else [])

    def file_name(self, i: int) -> str:
        return self.refs[i] if i < len(self.refs) else self.shards.where(i - len(self.refs))

    def load(self, i: int):
        """(PIL image, id, carried columns) of item i; InputError (or OSError) naming the file or record."""
        if i >= len(self.refs):
            index = i - len(self.refs)
            data, where = self.shards[index], self.shards.where(index)
            if isinstance(data, Unreadable):
                raise InputError(data.message())
            record = decode_record(data, where)
            names = dict(zip(RECORD_COLUMNS, [*record["ranks"], record["common"]]))
            return decode_image(record["image"], where), record["id"], {**dict.fromkeys(self.columns), **names}
        ref = self.refs[i]
        carried = {name: values[i] for name, values in self.columns.items()}
        if paths.is_url(ref):
            return decode_image(paths.resolve(ref).read_bytes(), ref), self.ids[i], carried
        return load_image(ref), self.ids[i], carried

    def fingerprint(self) -> str:
        """Names the item list (what a resumed run must agree on): a hash of every path and id in order, and of
        the shards and their record counts."""
        import hashlib

        digest = hashlib.sha256()
        for ref, item_id in zip(self.refs, self.ids):
            digest.update(f"{ref}\0{item_id}\n".encode())
        if self.shards is not None:
            digest.update(json.dumps([self.shard_paths, self.shards.counts]).encode())
        return digest.hexdigest()[:16]


def collect_inputs(specs: Sequence[str]) -> Inputs:
    """Expands every spec (see the module docstring) in the order given, shard records after the files; InputError
    for a glob or folder without images, a listing without a path column, or duplicate ids (naming them)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    inputs = Inputs()
    shard_files: list[str] = []
    for spec in map(os.fspath, specs):
        for kind, value, listed in _expand(spec):
            if kind == "shard":
                shard_files.append(value)
            elif kind == "listing":
                _add_listing(inputs, value)
            else:
                _add(inputs, value, listed, {})
    if shard_files:
        inputs.shards = open_shards(shard_files)
        inputs.shard_paths = list(shard_files)
    _check_unique(inputs.ids)
    if not len(inputs):
        raise InputError(f"no images in {', '.join(specs) or 'the inputs'}")
    return inputs


def _add(inputs: Inputs, path: str, item_id: str, carried: dict) -> None:
    n = len(inputs.refs)
    for name in [*inputs.columns, *(c for c in carried if c not in inputs.columns)]:  # a fixed column order
        inputs.columns.setdefault(name, [None] * n).append(carried.get(name))
    inputs.refs.append(path)
    inputs.ids.append(item_id)


def _check_unique(ids: list) -> None:
    seen, duplicates = set(), []
    for item_id in ids:
        if item_id in seen:
            duplicates.append(item_id)
        seen.add(item_id)
    if duplicates:
        shown = ", ".join(map(repr, sorted(set(duplicates))[:5]))
        raise InputError(f"duplicate ids: {shown} ({len(duplicates)} repeats); every input must have its own id "
                         f"(give a listing an id or uuid column to name them)")


def _expand(spec: str):
    """Yields (kind, value, listed) with kind "image", "shard" or "listing"; listed is the id a path gets."""
    if paths.is_url(spec):
        paths.check_reachable(spec)
    if any(c in spec for c in _GLOB_CHARS):
        matches = _glob(spec)
        found = [(k, m, m) for m in matches for k in [_kind(m)] if k in ("image", "shard")]
        if not found:
            raise InputError(f"{spec}: no images or {SHARD_SUFFIX} shards match (image suffixes: "
                             f"{', '.join(IMAGE_SUFFIXES)})")
        yield from found
    elif _is_dir(spec):
        found = [(k, m, m) for m in _walk(spec) for k in [_kind(m)] if k in ("image", "shard")]
        if not found:
            raise InputError(f"{spec}: a folder without images or {SHARD_SUFFIX} shards (image suffixes: "
                             f"{', '.join(IMAGE_SUFFIXES)})")
        yield from found
    else:
        kind = _kind(spec)
        # A file of any other suffix is an image too: what it is shows when it is read (as in pybioclip).
        yield ("image" if kind == "other" else kind), spec, spec


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(SHARD_SUFFIX):
        return "shard"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    if lower.endswith(LISTING_SUFFIXES):
        return "listing"
    return "other"


def _is_dir(spec: str) -> bool:
    return paths.resolve(spec).is_dir() if paths.is_url(spec) else os.path.isdir(spec)


def _glob(spec: str) -> list[str]:
    if not paths.is_url(spec):
        return sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
    parts = spec.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = paths.resolve("/".join(parts[:first]))
    return sorted(str(m) for m in root.glob("/".join(parts[first:])) if not m.is_dir())


def _walk(folder: str) -> list[str]:
    if paths.is_url(folder):
        return sorted(str(m) for m in paths.resolve(folder).rglob("*") if not m.is_dir())
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


# ------------------------------------------------------------------------------------------------------- listings
def read_listing(path: str):
    """A listing as a pyarrow Table: .txt one path per line (column "path"), .csv with a header, .parquet."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    data = paths.resolve(path).read_bytes()
    lower = path.lower()
    try:
        if lower.endswith(".txt"):
            lines = [line.strip() for line in data.decode("utf-8-sig").splitlines()]
            return pa.table({"path": [line for line in lines if line]})
        if lower.endswith(".csv"):
            # Every column as text: ids like 007 keep their zeros, and each part gets the same schema.
            names = pa_csv.read_csv(io.BytesIO(data), read_options=pa_csv.ReadOptions(block_size=1 << 16)).column_names
            return pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False))
        return pq.read_table(io.BytesIO(data))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read it as a {lower.rsplit('.', 1)[-1]} listing ({e})") from None


def _pick(names: list[str], wanted: Sequence[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def _add_listing(inputs: Inputs, listing: str) -> None:
    table = read_listing(listing)
    path_column = _pick(table.column_names, PATH_COLUMNS)
    if path_column is None:
        raise InputError(f"{listing}: no path column (columns: {', '.join(table.column_names) or 'none'}); name it "
                         f"one of {', '.join(PATH_COLUMNS)}")
    id_column = _pick(table.column_names, ID_COLUMNS)
    carried = [c for c in table.column_names if c not in (path_column, id_column)]
    clash = [c for c in carried if c in (EMB_COLUMN, FILE_COLUMN) or c.lower() in ID_COLUMNS]
    if clash:
        raise InputError(f"{listing}: column(s) {', '.join(clash)} would clash with the output's {ID_COLUMN}, "
                         f"{EMB_COLUMN} and {FILE_COLUMN} columns; rename them")
    listed = table.column(path_column).to_pylist()
    empty = [i + 1 for i, p in enumerate(listed) if not p]
    if empty:
        raise InputError(f"{listing}: empty {path_column!r} in row(s) {empty[:5]}")
    ids = [str(v) for v in table.column(id_column).to_pylist()] if id_column else [str(p) for p in listed]
    base = os.path.dirname(listing) if not paths.is_url(listing) else listing.rsplit("/", 1)[0]
    values = {c: table.column(c).to_pylist() for c in carried}
    for i, p in enumerate(map(str, listed)):
        # Relative paths are relative to the listing's folder, so a listing travels with its images.
        full = p if paths.is_url(p) or os.path.isabs(p) else (
            f"{base}/{p}" if paths.is_url(base) else os.path.normpath(os.path.join(base, p)))
        _add(inputs, full, ids[i], {c: values[c][i] for c in carried})
