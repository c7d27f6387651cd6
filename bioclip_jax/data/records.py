"""The shard record: one ArrayRecord record per image, encoded with msgpack (no TensorFlow anywhere).

Record format version 1, a msgpack map (documented in docs/data_format.md):
    "v":      1
    "id":     str    stable, unique id (e.g. the TreeOfLife key or the file path)
    "image":  bytes  encoded image (JPEG as written by make-shards)
    "ranks":  [7 str] kingdom, phylum, class, order, family, genus, species epithet ("" where unknown)
    "common": str    English common name ("" where unknown)
    "source": str    where it came from (e.g. "treeoflife", "folder", "synthetic")
    "label":  str    optional: the class label as given by an evaluation set (metadata.csv "class")
    "text":   str    optional: a free caption (image-text pairs such as LAION or DataComp, used as a replay stream)
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import itertools
import os
from pathlib import Path

import msgpack
from etils import epath

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError

FORMAT_VERSION = 1
SHARD_SUFFIX = ".array_record"


@dataclasses.dataclass
class Record:
    id: str
    image: bytes
    taxon: Taxon
    source: str = ""
    label: str = ""
    text: str = ""

    def to_bytes(self) -> bytes:
        t = self.taxon
        fields = {"v": FORMAT_VERSION, "id": self.id, "image": self.image,
                  "ranks": [t.kingdom, t.phylum, t.cls, t.order, t.family, t.genus, t.species],
                  "common": t.common_name, "source": self.source, "label": self.label}
        if self.text:  # only when set: records without a caption stay byte-identical to those written before
            fields["text"] = self.text
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "record") -> "Record":
        r = decode_record(data, where)
        return cls(id=r["id"], image=r["image"], taxon=Taxon.from_ranks(r["ranks"], r["common"]), source=r["source"],
                   label=r["label"], text=r["text"])


class RecordVersionError(InputError):
    """A record written by a newer bioclip_jax: refused (never skipped), since every record of its shard will be."""


def check_version(obj: dict, where: str) -> None:
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{where}: not a bioclip_jax record (format version {version!r})")
    if version > FORMAT_VERSION:
        raise RecordVersionError(f"{where}: record format version {version} is newer than this bioclip_jax reads "
                                 f"({FORMAT_VERSION}); upgrade bioclip_jax")


def decode_record(data: bytes, where: str = "record") -> dict:
    """Record bytes -> a plain dict (what Grain workers pass along): id, image bytes, ranks, common name, source,
    label. Raises InputError for bytes that are not a record, RecordVersionError for a newer format version."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise InputError(f"{where}: not a bioclip_jax record ({str(e) or type(e).__name__})") from None
    if not isinstance(obj, dict) or "v" not in obj:
        raise InputError(f"{where}: not a bioclip_jax record (no version field)")
    check_version(obj, where)
    ranks = obj.get("ranks")
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("image"), bytes) or \
            not isinstance(ranks, (list, tuple)) or len(ranks) != 7:
        raise InputError(f"{where}: not a bioclip_jax record (expected str id, bytes image and 7 ranks)")
    return {"id": obj["id"], "image": obj["image"], "ranks": tuple(ranks), "common": obj.get("common", ""),
            "source": obj.get("source", ""), "label": obj.get("label", ""), "text": obj.get("text", "")}


class ShardWriter:
    """Writes records to one ArrayRecord file under a temporary name; `close()` renames it into place, so a shard
    that exists under its final name is complete (what resumable writers rely on)."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
        self.count = 0

    def write(self, record: Record | bytes) -> None:
        self._writer.write(record if isinstance(record, bytes) else record.to_bytes())
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # never leave a half-written shard under its final name
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


def find_shards(pattern: str | os.PathLike) -> list[str]:
    """Shard files from a folder, a glob or a single file, sorted (the order every host must agree on)."""
    pattern = str(pattern)
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(pattern, f"*{SHARD_SUFFIX}")))
    else:
        paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards found at {pattern!r}")
    return paths


# ----------------------------------------------------------------------------------------------- reading shards
_BLOCK = 64 * 1024  # an ArrayRecord (Riegeli) file is made of 64 KiB blocks, its index at the end


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
    """array_record's FileInstruction protocol: lets the data source use record counts already read (no reopen)."""
    filename: str
    skip: int
    take: int
    examples_in_shard: int


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A record the shard could not return (a corrupt chunk): what the pipelines skip and report."""
    where: str
    error: str

    def message(self) -> str:
        return f"{self.where}: unreadable record ({self.error})"


def check_shard(path: str) -> int:
    """Opens one shard cheaply (its size, then the index at its end, then the first record's version) -> its number
    of records. Raises InputError naming the file and what is wrong: missing, empty, truncated, not an ArrayRecord
    file; RecordVersionError if it holds records of a newer format."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        size = epath.Path(path).stat().length  # epath: a gs:// shard is checked like a local one
    except FileNotFoundError:
        raise InputError(f"shard {path}: no such file") from None
    except OSError as e:
        raise InputError(f"shard {path}: cannot read it ({e.strerror or e})") from None
    if size == 0:
        raise InputError(f"shard {path}: empty file (0 bytes), not an ArrayRecord shard; rewrite it (make-shards)")
    if size < _BLOCK:
        raise InputError(f"shard {path}: {size} bytes, smaller than any ArrayRecord file (at least 64 KiB): "
                         f"truncated or not an ArrayRecord file")
    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    if not reader.ok():  # the reader defers its error to close()
        try:
            reader.close()
            detail = "unreadable index"
        except RuntimeError as e:
            detail = str(e).split(";")[0] or "unreadable index"
        hint = "" if size % _BLOCK == 0 else ", not a whole number of 64 KiB blocks"
        raise InputError(f"shard {path}: not a readable ArrayRecord file ({size} bytes{hint}; truncated, or not "
                         f"written by ArrayRecord: {detail})")
    try:
        count = reader.num_records()
        if count:
            try:
                first = msgpack.unpackb(reader.read([0])[0], raw=False)
            except Exception:  # noqa: BLE001 - a corrupt first record is skipped later like any other
                first = None
            if isinstance(first, dict) and "v" in first:
                check_version(first, f"shard {path} record 0")
    finally:
        reader.close()
    return count


class ShardSource:
    """Random access over validated shards (Grain's ArrayRecordDataSource underneath). A record that cannot be read
    comes back as `Unreadable` instead of raising, so the pipelines can skip it; `where(i)` names file and record."""

    def __init__(self, paths: list[str]):
        import grain

        if not paths:
            raise InputError("no shards given")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:  # shards may be remote: open in parallel
            counts = list(pool.map(check_shard, paths))
        self.paths, self.counts = list(paths), counts
        self._starts = list(itertools.accumulate([0] + counts))
        files = [_FileInstruction(p, 0, n, n) for p, n in zip(paths, counts) if n]
        self._source = grain.sources.ArrayRecordDataSource(files) if files else []
        self._length = self._starts[-1]

    def __len__(self) -> int:
        return self._length

    def where(self, index: int) -> str:
        shard = bisect.bisect_right(self._starts, index) - 1
        return f"{self.paths[shard]} record {index - self._starts[shard]}"

    def __getitem__(self, index: int):
        try:
            return self._source[index]
        except RuntimeError as e:  # Riegeli: a chunk whose hash does not match, a cut file
            return Unreadable(self.where(index), str(e).split(";")[0])

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shards, {len(self)} records)"


def open_shards(paths: list[str | os.PathLike]) -> ShardSource:
    """Shard paths -> a ShardSource, every shard checked first (see `check_shard`)."""
    return ShardSource([str(p) for p in paths])


def read_records(paths: list[str]):
    """Yields every Record of the given shards in order (for inspection, tests and evaluation); InputError naming
    the file and record for one that cannot be read or decoded."""
    source = open_shards(paths)
    for i in range(len(source)):
        data = source[i]
        if isinstance(data, Unreadable):
            raise InputError(data.message())
        yield Record.from_bytes(data, where=source.where(i))
