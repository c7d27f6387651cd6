"""Image-text pairs as Grain random-access sources (a replay stream, BioCLIP 2): WebDataset tars as img2dataset,
LAION, DataComp and CC3M publish them, and Parquet files holding the image bytes (img2dataset's parquet output,
Hugging Face datasets' Image column).

Each item is the dict `records.decode_record` makes of a record with a `text` caption (no taxon, empty ranks), so the
training pipeline (`pipeline.TrainTransform`, `Captioner` with text_type "text") treats it as one of our records.

Tars: a pair is the members sharing a key (WebDataset's rule: the member name up to the first dot of its file name),
`KEY.jpg` / `.jpeg` / `.png` / `.webp` plus `KEY.txt`; other members (`.json`, ...) are ignored. The index (where each
image and caption starts, 16 bytes a pair) is built once per tar when the source opens, from the tar headers only,
and kept in memory: it travels inside the pickled source to Grain's worker processes, so no worker scans again, and
nothing is written next to the user's tars (often read-only, or in a bucket) nor into a cache that could go stale
when a tar is rewritten. Headers are parsed here (`tar_members`), several times faster than tarfile. Each item is
then two reads at known offsets; its id is the key its image's header names (a key over the 100 characters of a plain
header: the tar and the pair's position).

Parquet: the image column is the first of IMAGE_COLUMNS present (or `image_column`), binary or a struct with a
`bytes` field (Hugging Face's Image); the caption column the first of CAPTION_COLUMNS (or `caption_column`). Items
are read by row group (Parquet's unit of random access), the last few row groups cached per reading thread.

Pairs without an image or a caption are counted and skipped when the source opens, with one warning per file naming
it, the counts and an example key. Files are opened lazily, in each process and thread that reads."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import logging
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from etils import epath

from bioclip_jax.data.records import SHARD_SUFFIX, Unreadable
from bioclip_jax.errors import InputError, first_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar members, in the order one is picked when a key has several
CAPTION_EXTENSION = "txt"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")  # Parquet, matched ignoring case
CAPTION_COLUMNS = ("caption", "txt", "text")
TAR, PARQUET, SHARDS = ".tar", ".parquet", SHARD_SUFFIX
NO_RANKS = ("",) * 7
OPEN_FILES_PER_THREAD = 32  # replay sets span thousands of tars: keep each reading thread under the fd limit
# Per reading thread; a shuffled stream over many row groups rarely reads one twice (docs/data_format.md).
ROW_GROUPS_CACHED = 2
_BLOCK = tarfile.BLOCKSIZE  # 512: a tar member's data starts on a block boundary


def pair_record(key: str, image: bytes, text: str, source: str) -> dict:
    """What `records.decode_record` returns for a record of an image-text pair."""
    return {"id": key, "image": image, "ranks": NO_RANKS, "common": "", "source": source, "label": "", "text": text}


# ------------------------------------------------------------------------------------------ which reader, which files
def classify(data: str | os.PathLike | Sequence) -> tuple[str, list[str]]:
    """What `data` points at -> (TAR, PARQUET or SHARDS, sorted paths). A folder: its .array_record, .tar or .parquet
    files (next to tars, img2dataset's metadata `NAME.parquet` of each `NAME.tar` is left out); a glob or a list: the
    files' suffixes (anything that is neither .tar nor .parquet is a shard, as before). InputError for a mix of
    kinds or a folder of none; FileNotFoundError when nothing is there."""
    if isinstance(data, (list, tuple)):
        paths, where = [os.fspath(p) for p in data], "the list of data files"
    elif os.path.isdir(data):
        return _classify_folder(os.fspath(data))
    else:
        paths, where = sorted(glob.glob(os.fspath(data))), repr(os.fspath(data))
        if not paths:
            raise FileNotFoundError(f"no {SHARDS} shards found at {os.fspath(data)!r} (nor .tar or .parquet files)")
    kinds = {_kind(p) for p in paths}
    if len(kinds) > 1:
        raise InputError(f"{where} mixes {', '.join(sorted(kinds))} files: expected one kind ({_EXPECTED})")
    return kinds.pop(), paths


_EXPECTED = f"ArrayRecord shards ({SHARDS}), WebDataset tars (.tar) or Parquet files (.parquet)"


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith((".tar.gz", ".tgz")):
        raise InputError(f"{path}: a compressed tar cannot be read by offset; decompress it (gunzip) into a .tar")
    return TAR if name.endswith(TAR) else PARQUET if name.endswith(PARQUET) else SHARDS


def _classify_folder(folder: str) -> tuple[str, list[str]]:
    names = sorted(os.listdir(folder))
    by_kind = {kind: [n for n in names if n.endswith(kind)] for kind in (SHARDS, TAR, PARQUET)}
    compressed = [n for n in names if n.endswith((".tar.gz", ".tgz"))]
    if by_kind[TAR]:  # img2dataset writes 00000.tar with its metadata 00000.parquet (no image bytes) beside it
        stems = {n[:-len(TAR)] for n in by_kind[TAR]}
        by_kind[PARQUET] = [n for n in by_kind[PARQUET] if n[:-len(PARQUET)] not in stems]
    found = {kind: files for kind, files in by_kind.items() if files}
    if len(found) > 1:
        counts = ", ".join(f"{len(files)} {kind}" for kind, files in found.items())
        raise InputError(f"folder {folder} holds {counts} files: expected one kind ({_EXPECTED})")
    if not found:
        if compressed:
            raise InputError(f"folder {folder}: {compressed[0]} is a compressed tar, which cannot be read by offset; "
                             f"decompress the tars (gunzip) into .tar files")
        if not names:
            raise FileNotFoundError(f"no {SHARDS} shards found at {folder!r} (nor .tar or .parquet files)")
        suffixes = sorted({os.path.splitext(n)[1] or n for n in names})[:5]
        raise InputError(f"folder {folder} holds none of {_EXPECTED} (found: {', '.join(suffixes)})")
    kind, files = found.popitem()
    return kind, [os.path.join(folder, n) for n in files]


def open_pairs(kind: str, paths: list[str], image_column: str = "", caption_column: str = ""):
    """(TAR or PARQUET, paths) from `classify` -> a TarPairSource or ParquetPairSource."""
    if kind == TAR:
        return TarPairSource(paths)
    return ParquetPairSource(paths, image_column=image_column, caption_column=caption_column)


# ------------------------------------------------------------------------------------------------ reading per thread
class _Handles(threading.local):
    """This thread's open files and cached row groups (a forked or spawned worker starts with none: see `pid`)."""

    def __init__(self):
        self.pid = os.getpid()
        self.files: collections.OrderedDict = collections.OrderedDict()
        self.row_groups: collections.OrderedDict = collections.OrderedDict()


class _LazyFiles:
    """Opens files on first use, per process and thread (seek + read on a handle no other thread moves), at most
    OPEN_FILES_PER_THREAD at a time; pickles without them, so Grain's worker processes open their own."""

    def __init__(self):
        self._local = _Handles()

    def _count(self, indexes: Sequence, counts: list[int]) -> None:
        """The files' item counts, where each file's items start, and the keys their indexes left out, by reason."""
        self.counts = counts
        self._starts = _starts(counts)
        self.skipped = collections.Counter()
        for i in indexes:
            self.skipped.update(i.missing)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _Handles()

    def _handles(self) -> _Handles:
        if self._local.pid != os.getpid():  # forked with the parent's thread state: never share its file offsets
            self._local = _Handles()
        return self._local

    def _file(self, path: str, opener=None):
        """`path` opened by `opener` (default: a binary file), kept open for this thread's next reads."""
        files = self._handles().files
        if path in files:
            files.move_to_end(path)
            return files[path]
        if len(files) >= OPEN_FILES_PER_THREAD:
            files.popitem(last=False)[1].close()
        files[path] = (opener or _open_binary)(path)
        return files[path]


def _open_binary(path: str):
    return epath.Path(path).open("rb")


def _open_parquet(path: str):
    """A pyarrow ParquetFile: local files through pyarrow's own reader (no Python file object in the way), URLs
    (gs://) through epath."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path if "://" not in path else _open_binary(path))


def _starts(counts: Sequence[int]) -> list[int]:
    return [0, *np.cumsum(counts, dtype=np.int64).tolist()]


def _open_all(function, paths: Sequence[str]) -> list:
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:  # files may be remote: index them in parallel
        return list(pool.map(function, paths))


def _warn_skipped(path: str, total: int, missing: dict[str, int], example: str) -> None:
    """One warning per file that had pairs without an image or a caption: its name, the counts, one of them."""
    if any(missing.values()):
        counts = ", ".join(f"{n} {why}" for why, n in missing.items() if n)
        log.warning("%s: skipped %d of %d pairs (%s), e.g. %s", path, sum(missing.values()), total, counts, example)


# ------------------------------------------------------------------------------------------------------- tars
_ENTRY = np.dtype([("image_block", "<u4"), ("image_size", "<u4"), ("text_block", "<u4"), ("text_size", "<u4")])
_KEY = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # WebDataset: key up to the first dot of the file name


_NOT_A_TAR = "expected a WebDataset tar of image-text pairs (uncompressed, e.g. img2dataset's output_format=webdataset)"
_FILE_TYPES = (b"0", b"\0", b"7")  # regular (and contiguous) files; directories, links and devices are passed over
_POSIX_MAGIC = b"ustar\x0000"


def tar_members(f, size: int, path: str):
    """Yields (name, data offset, data size) of each regular file in a tar, from its headers alone (what tarfile
    reads, with GNU long names and pax path and size records, at several times its speed: a replay set of 26M pairs
    is 78M headers). InputError naming the file for a header that is not a tar header, or a cut-off member."""
    offset, long_name, pax = 0, None, {}
    while offset + _BLOCK <= size:
        f.seek(offset)
        header = f.read(_BLOCK)
        if header.count(0) == _BLOCK:  # the end-of-archive blocks
            return
        stored = _octal(header[148:156], path, offset)
        if stored != sum(header) - sum(header[148:156]) + 256 and stored != _signed_sum(header):
            raise InputError(f"{path}: not a tar file (no valid tar header at byte {offset}); {_NOT_A_TAR}")
        kind, data, length = header[156:157], offset + _BLOCK, _octal(header[124:136], path, offset)
        if kind in (b"L", b"x"):  # the next member's long name (GNU) or pax records (path, size)
            f.seek(data)
            payload = f.read(length)
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _pax_records(payload, path, offset)
        else:
            name = pax.get("path") or long_name or _ustar_name(header)
            length = int(pax.get("size", length))
            long_name, pax = None, {}
            if kind in _FILE_TYPES:
                if data + length > size:
                    raise InputError(f"{path}: truncated tar (member {name} ends at byte {data + length}, the file "
                                     f"has {size})")
                yield name, data, length
        offset = data + -(-length // _BLOCK) * _BLOCK


def _octal(field: bytes, path: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB
        return tarfile.nti(field)
    try:
        return int(field.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        raise InputError(f"{path}: not a tar file (no valid tar header at byte {offset}); {_NOT_A_TAR}") from None


def _signed_sum(header: bytes) -> int:  # what some old tars checksummed (tarfile accepts both)
    return int(np.frombuffer(header, np.int8).sum()) - int(np.frombuffer(header[148:156], np.int8).sum()) + 256


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] == _POSIX_MAGIC:
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes, path: str, offset: int) -> dict[str, str]:
    """A pax extended header's "LENGTH key=value\\n" records."""
    records, pos = {}, 0
    try:
        while pos < len(payload) and payload[pos] != 0:
            space = payload.index(b" ", pos)
            length = int(payload[pos:space])
            key, _, value = payload[space + 1:pos + length - 1].partition(b"=")
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos += length
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path}: corrupt pax header at byte {offset}; {_NOT_A_TAR}") from None
    return records


@dataclasses.dataclass
class TarIndex:
    """Where each pair of one tar lies (data offsets in 512-byte blocks: tars up to 2 TiB), and what was skipped."""
    entries: np.ndarray
    missing: dict[str, int]


def index_tar(path: str) -> TarIndex:
    """Scans one tar's headers (not its data) -> its pairs, in the order their keys first appear. InputError naming
    the file for one that is not a readable, complete tar."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with epath.Path(path).open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            for name, offset, length in tar_members(f, size, path):
                match = _KEY.match(name)
                if match:
                    members.setdefault(match.group(1), {}).setdefault(match.group(2).lower(), (offset, length))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    rows, missing = [], {"without an image (.jpg/.jpeg/.png/.webp)": [], "without a caption (.txt)": []}
    for key, found in members.items():
        image = next((found[e] for e in IMAGE_EXTENSIONS if e in found), None)
        text = found.get(CAPTION_EXTENSION)
        if image is None:
            missing["without an image (.jpg/.jpeg/.png/.webp)"].append(key)
        elif text is None or text[1] == 0:
            missing["without a caption (.txt)"].append(key)
        else:
            rows.append((image[0] // _BLOCK, image[1], text[0] // _BLOCK, text[1]))
    counts = {why: len(keys) for why, keys in missing.items()}
    _warn_skipped(path, len(members), counts, next((f"key {k[0]!r}" for k in missing.values() if k), ""))
    return TarIndex(np.array(rows, dtype=_ENTRY), counts)


class TarPairSource(_LazyFiles):
    """Random access over the image-text pairs of WebDataset tars (see the module doc). `where(i)` names the tar
    and the pair's position in it; `skipped` counts the keys left out, by reason."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        if not paths:
            raise InputError("no tars given")
        indexes = _open_all(index_tar, [os.fspath(p) for p in paths])
        self.paths = [os.fspath(p) for p in paths]
        self._count(indexes, [len(i.entries) for i in indexes])
        self._entries = np.concatenate([i.entries for i in indexes])

    def _locate(self, index: int) -> tuple[int, int]:
        tar = bisect.bisect_right(self._starts, index) - 1
        return tar, index - self._starts[tar]

    def where(self, index: int) -> str:
        tar, position = self._locate(index)
        return f"{self.paths[tar]} pair {position}"

    def __getitem__(self, index: int):
        index = int(index)
        tar, _ = self._locate(index)
        entry = self._entries[index]
        try:
            f = self._file(self.paths[tar])
            # The image's own header block comes with it: its name is the pair's key (the record's id).
            f.seek((int(entry["image_block"]) - 1) * _BLOCK)
            data = f.read(_BLOCK + int(entry["image_size"]))
            f.seek(int(entry["text_block"]) * _BLOCK)
            text = f.read(int(entry["text_size"]))
        except OSError as e:
            return Unreadable(self.where(index), first_line(e))
        if len(data) != _BLOCK + entry["image_size"] or len(text) != entry["text_size"]:
            return Unreadable(self.where(index), "the tar is shorter than when it was indexed")
        try:
            match = _KEY.match(tarfile.TarInfo.frombuf(data[:_BLOCK], "utf-8", "surrogateescape").name)
        except tarfile.TarError:
            match = None
        key = match.group(1) if match else self.where(index)
        return pair_record(key, data[_BLOCK:], text.decode("utf-8", "replace"), "webdataset")

    def __repr__(self) -> str:
        return f"TarPairSource({len(self.paths)} tars, {len(self)} pairs)"


# ---------------------------------------------------------------------------------------------------- parquet
@dataclasses.dataclass(frozen=True)
class _Columns:
    """The image and caption columns picked in one Parquet file: image_path is the column path ("image" or, for
    Hugging Face's Image struct, ("image", "bytes"))."""
    image_path: tuple[str, ...]
    caption: str
    key: str | None  # img2dataset's "key": the record's id where present


def _pick(names: Sequence[str], wanted: str, defaults: Sequence[str]) -> str | None:
    if wanted:
        return wanted if wanted in names else None
    lower = {n.lower(): n for n in reversed(names)}
    return next((lower[d] for d in defaults if d in lower), None)


def _binary(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _image_path(schema, image_column: str) -> tuple[str, ...] | None:
    """The image column's path: ("jpg",), or into a struct, ("image", "bytes") (Hugging Face's Image, also when
    named "image"); None when the column is missing or holds no bytes."""
    import pyarrow as pa

    if image_column in schema.names:
        path = (image_column,)
    elif image_column:
        path = tuple(image_column.split("."))
    else:
        path = (_pick(schema.names, "", IMAGE_COLUMNS),)
    if path[0] not in schema.names:
        return None
    arrow_type = schema.field(path[0]).type
    for name in path[1:]:
        if not pa.types.is_struct(arrow_type) or arrow_type.get_field_index(name) < 0:
            return None
        arrow_type = arrow_type.field(name).type
    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        path, arrow_type = (*path, "bytes"), arrow_type.field("bytes").type
    return path if _binary(arrow_type) else None


def parquet_columns(path: str, schema, image_column: str = "", caption_column: str = "") -> _Columns:
    """The columns to read from a Parquet file's arrow schema; InputError naming the file, the columns it has and
    the config key to set when none fits."""
    import pyarrow as pa

    names = schema.names
    caption = _pick(names, caption_column, CAPTION_COLUMNS)
    if caption is None or not (pa.types.is_string(schema.field(caption).type) or
                               pa.types.is_large_string(schema.field(caption).type)):
        what = f"column {caption_column!r}" if caption_column else f"caption column ({', '.join(CAPTION_COLUMNS)})"
        raise InputError(f"{path}: no {what} holding text (columns: {', '.join(names)}); name it with "
                         f"--config.replay.caption_column=NAME")
    image = _image_path(schema, image_column)
    if image is None:
        what = f"column {image_column!r}" if image_column else f"image column ({', '.join(IMAGE_COLUMNS)})"
        raise InputError(f"{path}: no {what} holding image bytes (columns: {', '.join(names)}; a column of URLs must "
                         f"be fetched first, e.g. img2dataset --output_format parquet); name it with "
                         f"--config.replay.image_column=NAME")
    return _Columns(image, caption, _pick(names, "", ("key",)))


def _column(table, path: tuple[str, ...]):
    import pyarrow.compute as pc

    column = table.column(path[0])
    return pc.struct_field(column, list(path[1:])) if len(path) > 1 else column


@dataclasses.dataclass
class ParquetIndex:
    """One Parquet file: its columns, the first row of each row group, the rows that hold a pair, and what was
    skipped."""
    columns: _Columns
    group_starts: list[int]
    rows: np.ndarray
    missing: dict[str, int]


def index_parquet(path: str, image_column: str = "", caption_column: str = "") -> ParquetIndex:
    """Reads one Parquet file's footer and caption column (and, only in row groups whose statistics do not rule
    out missing images, its image column) -> the rows that hold a pair. InputError naming the file when it is not
    Parquet or lacks the columns."""
    import pyarrow as pa

    try:
        parquet = _open_parquet(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a Parquet file ({first_line(e)})") from None
    with parquet:
        columns = parquet_columns(path, parquet.schema_arrow, image_column, caption_column)
        captions = parquet.read(columns=[columns.caption]).column(0)
        valid = np.asarray(captions.is_valid()) & (np.asarray(_lengths(captions)) > 0)
        has_image = np.ones(len(valid), bool)
        meta, leaf = parquet.metadata, ".".join(columns.image_path)
        starts = _starts([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        image_leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == leaf)
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(image_leaf).statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                table = parquet.read_row_group(group, columns=[columns.image_path[0]])
                images = _column(table, columns.image_path)
                has_image[starts[group]:starts[group + 1]] = np.asarray(images.is_valid()) & \
                    (np.asarray(_lengths(images)) > 0)
    missing = {f"without image bytes ({leaf})": np.flatnonzero(~has_image),
               f"without a caption ({columns.caption})": np.flatnonzero(has_image & ~valid)}
    counts = {why: len(rows) for why, rows in missing.items()}
    _warn_skipped(path, len(valid), counts, next((f"row {rows[0]}" for rows in missing.values() if len(rows)), ""))
    return ParquetIndex(columns, starts, np.flatnonzero(has_image & valid), counts)


def _lengths(array):
    import pyarrow.compute as pc

    return pc.fill_null(pc.binary_length(array), 0)


class ParquetPairSource(_LazyFiles):
    """Random access over the image-text pairs of Parquet files (see the module doc): item i is read from its row
    group, which stays cached (ROW_GROUPS_CACHED per thread). `where(i)` names the file and row."""

    def __init__(self, paths: Sequence[str], image_column: str = "", caption_column: str = ""):
        super().__init__()
        if not paths:
            raise InputError("no Parquet files given")
        self.paths = [os.fspath(p) for p in paths]
        indexes = _open_all(lambda p: index_parquet(p, image_column, caption_column), self.paths)
        self._columns = [i.columns for i in indexes]
        self._group_starts = [i.group_starts for i in indexes]
        self._rows = [i.rows for i in indexes]
        self._count(indexes, [len(i.rows) for i in indexes])

    def _locate(self, index: int) -> tuple[int, int]:
        file = bisect.bisect_right(self._starts, index) - 1
        return file, int(self._rows[file][index - self._starts[file]])

    def where(self, index: int) -> str:
        file, row = self._locate(index)
        return f"{self.paths[file]} row {row}"

    def __getitem__(self, index: int):
        file, row = self._locate(int(index))
        group = bisect.bisect_right(self._group_starts[file], row) - 1
        try:
            images, captions, keys = self._row_group(file, group)
        except OSError as e:
            return Unreadable(self.where(index), first_line(e))
        at = row - self._group_starts[file][group]
        key = keys[at].as_py() if keys is not None else None
        return pair_record(str(key) if key is not None else self.where(index), images[at].as_py(),
                           captions[at].as_py(), "parquet")

    def _row_group(self, file: int, group: int) -> tuple[Any, Any, Any]:
        cache = self._handles().row_groups
        if (file, group) in cache:
            cache.move_to_end((file, group))
            return cache[(file, group)]
        columns = self._columns[file]
        names = [columns.image_path[0], columns.caption] + ([columns.key] if columns.key else [])
        table = self._file(self.paths[file], _open_parquet).read_row_group(group, columns=names)
        cache[(file, group)] = (_column(table, columns.image_path), table.column(columns.caption),
                                table.column(columns.key) if columns.key else None)
        if len(cache) > ROW_GROUPS_CACHED:
            cache.popitem(last=False)
        return cache[(file, group)]

    def __repr__(self) -> str:
        return f"ParquetPairSource({len(self.paths)} files, {len(self)} pairs)"
