"""The shard record: one ArrayRecord record per image, encoded with msgpack (no TensorFlow anywhere).

Record format version 1, a msgpack map (documented in docs/data_format.md):
    "v":      1
    "id":     str    stable, unique id (e.g. the TreeOfLife key or the file path)
    "image":  bytes  encoded image (JPEG as written by make-shards)
    "ranks":  [7 str] kingdom, phylum, class, order, family, genus, species epithet ("" where unknown)
    "common": str    English common name ("" where unknown)
    "source": str    where it came from (e.g. "treeoflife", "folder", "synthetic")
    "label":  str    optional: the class label as given by an evaluation set (metadata.csv "class")
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path

import msgpack

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

    def to_bytes(self) -> bytes:
        t = self.taxon
        return msgpack.packb({"v": FORMAT_VERSION, "id": self.id, "image": self.image,
                              "ranks": [t.kingdom, t.phylum, t.cls, t.order, t.family, t.genus, t.species],
                              "common": t.common_name, "source": self.source, "label": self.label},
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "record") -> "Record":
        r = decode_record(data, where)
        return cls(id=r["id"], image=r["image"], taxon=Taxon.from_ranks(r["ranks"], r["common"]), source=r["source"],
                   label=r["label"])


def decode_record(data: bytes, where: str = "record") -> dict:
    """Record bytes -> a plain dict (what Grain workers pass along): id, image bytes, ranks, common name, source,
    label. Raises InputError for bytes that are not a record, or a record of a newer format version."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
        raise InputError(f"{where}: not a bioclip_jax record ({e})") from None
    if not isinstance(obj, dict) or "v" not in obj:
        raise InputError(f"{where}: not a bioclip_jax record (no version field)")
    if obj["v"] > FORMAT_VERSION:
        raise InputError(f"{where}: record format version {obj['v']} is newer than this bioclip_jax reads "
                         f"({FORMAT_VERSION}); upgrade bioclip_jax")
    return {"id": obj["id"], "image": obj["image"], "ranks": tuple(obj["ranks"]), "common": obj.get("common", ""),
            "source": obj.get("source", ""), "label": obj.get("label", "")}


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


def read_records(paths: list[str]):
    """Yields every Record of the given shards in order (for inspection, tests and evaluation)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    source = ArrayRecordDataSource(paths)
    for i in range(len(source)):
        yield Record.from_bytes(source[i], where=f"record {i} of {paths}")
