"""The output folder of make-shards: its manifest, the shards (atomic: a shard under its final name is complete, so a
rerun keeps it), per-shard stats in `<split>/.stats/<shard>.json` and the summaries (docs/data_format.md)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

from bioclip_jax.data.records import FORMAT_VERSION, SHARD_SUFFIX, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.shards.build import Skip

MANIFEST = "make_shards.json"
SUMMARY = "summary.json"


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass(frozen=True, eq=False)
class Shard:
    """One output shard: its files and its slice of the plan (`items`, as the source planned them). `group` is the
    plan group it was cut from (a source that streams reads a group's shards in one pass)."""
    path: str
    stats_path: str
    items: Any
    split: str
    group: int = 0

    @classmethod
    def at(cls, out: str, split: str, prefix: str | None, index: int, count: int, items, group: int = 0) -> "Shard":
        name = shard_name(prefix or split, index, count)
        return cls(os.path.join(out, split, name), os.path.join(out, split, ".stats", name + ".json"), items, split,
                   group)

    @property
    def finished(self) -> bool:
        """Written by an earlier run: the shard and its stats are both in place."""
        return os.path.exists(self.path) and os.path.exists(self.stats_path)

    def read_stats(self) -> dict:
        with open(self.stats_path) as f:
            return json.load(f)


class ShardSink:
    """One shard being filled, sample by sample: records go to its ShardWriter (none when the shard exists and only
    its lost stats are recounted), counts to its stats. `finish` writes the stats, then renames the shard into place,
    so a shard under its final name always has its stats."""

    def __init__(self, shard: Shard):
        self.shard, self.left = shard, len(shard.items)
        self.writer = None if os.path.exists(shard.path) else ShardWriter(shard.path)
        self.stats = {"file": os.path.basename(shard.path), "records": 0, "skipped": [],
                      "kingdoms": collections.Counter()}

    def write(self, record: bytes, taxon: Taxon) -> None:
        if self.writer is not None:
            self.writer.write(record)
        self.stats["records"] += 1
        self.stats["kingdoms"][taxon.ranks[0] or "(none)"] += 1
        self.left -= 1

    def skip(self, name: str, skip: Skip) -> None:
        self.stats["skipped"].append({"name": name, "reason": skip.reason, "detail": skip.detail})
        self.left -= 1

    def finish(self) -> dict:
        save_json(self.shard.stats_path, self.stats)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.stats

    def abort(self, e: BaseException) -> None:
        if self.writer is not None:
            self.writer.__exit__(type(e), e, None)  # closes and removes the .partial file
            self.writer = None


def save_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def check_manifest(out: str, manifest: dict) -> dict | None:
    """Records what is being written, and refuses to mix shards of another plan into `out`. Returns the previous
    summary when that run already finished (every shard and its stats present): then nothing needs redoing."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        save_json(path, manifest)
        return None
    with open(path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
        raise InputError(f"{out} holds shards made with other settings (differs in: {', '.join(diff)}); "
                         f"use another --out or delete it")
    try:
        with open(os.path.join(out, SUMMARY)) as f:
            summary = json.load(f)
        needed = [os.path.join(out, split, name) for split, info in summary["splits"].items()
                  for name in [SUMMARY] + [s["file"] for s in info["shards"]]
                  + [os.path.join(".stats", s["file"] + ".json") for s in info["shards"]]]
        if all(os.path.exists(p) for p in needed):
            return summary
    except (OSError, ValueError, KeyError):
        pass
    return None


def split_summary(source: str, split: str, stats: list[dict], skipped: list[dict]) -> dict:
    skipped = skipped + [s for st in stats for s in st["skipped"]]
    kingdoms: collections.Counter = collections.Counter()
    for st in stats:
        kingdoms.update(st["kingdoms"])
    return {"format_version": FORMAT_VERSION, "source": source, "split": split,
            "records": sum(st["records"] for st in stats),
            "shards": [{"file": st["file"], "records": st["records"]} for st in stats],
            "skipped": {"count": len(skipped), "reasons": dict(collections.Counter(s["reason"] for s in skipped)),
                        "items": skipped},
            "kingdoms": dict(sorted(kingdoms.items(), key=lambda kv: (-kv[1], kv[0])))}


def write_summary(out: str, source: str, manifest: dict, stats: dict[str, list[dict]], skipped: dict[str, list],
                  input_errors: list[dict], extra: dict) -> dict:
    """Every split's summary.json from its shards' stats, then OUT/summary.json (`extra` joins it) -> the latter."""
    summary = {"format_version": FORMAT_VERSION, "source": source, "settings": manifest, "records": 0,
               "skipped": len(input_errors), "input_errors": input_errors, **extra, "splits": {}}
    for split, split_stats in stats.items():
        info = split_summary(source, split, split_stats, skipped.get(split, []))
        save_json(os.path.join(out, split, SUMMARY), info)
        summary["splits"][split] = info
        summary["records"] += info["records"]
        summary["skipped"] += info["skipped"]["count"]
    save_json(os.path.join(out, SUMMARY), summary)
    return summary


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a make-shards run wrote: `data` is OUT/summary.json; `report()` says it in a few lines. Equal when the
    data are (the folder and the time taken aside)."""
    data: dict
    out: str = dataclasses.field(default="", compare=False)
    seconds: float | None = dataclasses.field(default=None, compare=False)
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)  # the source's lines on its own sections

    def __getitem__(self, key: str):
        return self.data[key]

    def report(self) -> str:
        data = self.data
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        lines = [f"make-shards {data['source']}: {data['records']} records, {data['skipped']} skipped -> "
                 f"{self.out}{took}"]
        for split, info in data["splits"].items():
            reasons = ", ".join(f"{r}: {n}" for r, n in info["skipped"]["reasons"].items())
            lines.append(f"  {split}: {info['records']} records in {len(info['shards'])} shard(s)"
                         + (f"; skipped {info['skipped']['count']} ({reasons})" if reasons else ""))
        kingdoms: collections.Counter = collections.Counter()
        for info in data["splits"].values():
            kingdoms.update(info["kingdoms"])
        if kingdoms:
            top = ", ".join(f"{k} {n}" for k, n in kingdoms.most_common(8))
            lines.append(f"  kingdoms: {top}" + (f" and {len(kingdoms) - 8} more" if len(kingdoms) > 8 else ""))
        lines += ["  " + note for note in self.notes]
        lines += [f"  input error: {err['name']}: {err['reason']} ({err['detail']})" for err in data["input_errors"]]
        return "\n".join(lines)
