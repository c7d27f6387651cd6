"""TreeOfLife-10M webdataset tars (BioCLIP's training shards: `<key>.jpg` next to `<key>.taxonTag.txt` & co.) as a
make-shards source, and the tar file patterns every tar source takes.

Taxonomy parsing follows how BioCLIP's TreeOfLife-10M writer produced its text files (see docs/data_format.md):
`taxonomic_name.txt` drops missing ranks, so only `taxonTag.txt` ("kingdom Animalia phylum ...") places every rank
exactly; `common_name.txt` holds the scientific (else taxonomic) name when no common name existed.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import tarfile
from typing import NamedTuple

from bioclip_jax.data.taxonomy import RANKS, Taxon, epithet, is_fallback_common
from bioclip_jax.shards.build import Example, Skip, describe
from bioclip_jax.shards.pool import map_ordered
from bioclip_jax.shards.source import ItemSource, Plan, read_at, split_by_id

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# webdataset keys/extensions: the key is the member path up to the first "." of its file name, the extension (lower
# cased, as webdataset does) is the rest. Only these members are kept in the index; the other caption files are
# derived from them by BioCLIP and carry no extra information.
TEXT_EXTS = ("taxontag.txt", "taxontag_com.txt", "taxonomic_name.txt", "taxon.txt", "scientific_name.txt",
             "sci.txt", "common_name.txt", "com.txt")
_WANTED = frozenset(IMAGE_EXTS + TEXT_EXTS)


# ----------------------------------------------------------------------------------------------------- taxonomy


def strip_caption(text: str | None) -> str:
    """"a photo of X." -> "X" (BioCLIP's caption files); plain names pass through."""
    text = (text or "").strip()
    if text.lower().startswith("a photo of "):
        text = text[len("a photo of "):]
    return text[:-1].strip() if text.endswith(".") else text


def parse_tagged(text: str) -> list[str] | None:
    """"[a photo of ]kingdom Animalia phylum Chordata ... species hudsonia[.]" -> 7 ranks, or None if the text does
    not start with a rank name. A rank word only opens a new rank when it comes after the current one, so a value
    that happens to be a rank word cannot reorder the lineage."""
    text = strip_caption(text).split(" with common name ")[0]
    ranks, current = [""] * 7, -1
    for token in text.split():
        idx = RANKS.index(token) if token in RANKS else -1
        if idx > current:
            current = idx
        elif current < 0:
            return None
        else:
            ranks[current] = f"{ranks[current]} {token}".strip()
    if current < 0:
        return None
    ranks[6] = epithet(ranks[5], ranks[6])
    return ranks


def parse_positional(taxonomic: str, scientific: str) -> list[str]:
    """Best effort without taxonTag: genus and epithet from the scientific name (or a lower-case tail, which can
    only be an epithet), the higher ranks filled from kingdom on. A missing higher rank shifts the ones below it up;
    only taxonTag can avoid that, which is why it is preferred."""
    tokens = strip_caption(taxonomic).split()
    if len(tokens) >= 7:
        return tokens[:6] + [" ".join(tokens[6:])]
    sci = strip_caption(scientific).split()
    genus, species = (sci[0], " ".join(sci[1:])) if sci else ("", "")
    if species and [t.lower() for t in tokens[-len(sci) + 1:]] == [s.lower() for s in sci[1:]]:
        del tokens[-len(sci) + 1:]
    if genus and tokens and tokens[-1].lower() == genus.lower():
        tokens.pop()
    elif not sci and tokens and tokens[-1][:1].islower():  # "... Pica hudsonia": binomial tail
        species = tokens.pop()
        genus = tokens.pop() if tokens else ""
    if not genus and not species:
        return (tokens + [""] * 7)[:7]
    return (tokens + [""] * 5)[:5] + [genus, species]


def treeoflife_taxon(texts: dict[str, str]) -> Taxon:
    """Taxon from one sample's text files (keys: lower-cased extensions such as "taxontag.txt")."""
    def get(*exts: str) -> str:  # the first non-empty file of these, caption wording removed
        return next((strip_caption(texts[e]) for e in exts if texts.get(e, "").strip()), "")

    tagged = get("taxontag.txt", "taxontag_com.txt")
    taxonomic, scientific = get("taxonomic_name.txt", "taxon.txt"), get("scientific_name.txt", "sci.txt")
    common = get("common_name.txt", "com.txt").split(" with common name ")[0]
    ranks = (parse_tagged(tagged) if tagged else None) or parse_positional(taxonomic, scientific)
    taxon = Taxon.from_ranks(ranks)
    if is_fallback_common(common, [scientific, taxonomic, taxon.scientific_name, taxon.taxonomic_name]):
        common = ""
    return Taxon.from_ranks(ranks, common)


# ----------------------------------------------------------------------------------------------------- tars


def expand_braces(pattern: str) -> list[str]:
    """"shard-{000000..000003}.tar" and "{a,b}" (webdataset / bash style) -> the list of patterns, zero padding kept."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def find_tars(patterns: list[str] | str, suffixes: tuple[str, ...] = (".tar",)) -> list[str]:
    """Tar files from folders (every file in it ending in one of `suffixes`), globs and brace patterns, in the order
    given (sorted within a folder or glob) so the plan, and thus the output, does not depend on the file system's
    listing order."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    found, missing = [], []
    for pattern in patterns:
        for p in expand_braces(str(pattern)):
            if os.path.isdir(p):
                paths = sorted(q for suffix in suffixes for q in glob.glob(os.path.join(p, "*" + suffix)))
            elif glob.has_magic(p):
                paths = sorted(glob.glob(p))
            else:
                paths = [p] if os.path.isfile(p) else []
            if not paths:
                missing.append(p)
            found += [q for q in map(os.path.normpath, paths) if q not in found]
    if missing:
        raise FileNotFoundError(f"no tar files at {', '.join(repr(m) for m in missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return found


class TarSample(NamedTuple):
    key: str
    tar: str
    members: dict  # lower-cased extension -> (data offset, size) in the tar


def index_tar(path: str) -> tuple[list[TarSample], list[dict]]:
    """One pass over the tar headers (seeking over the data) -> its samples in file order, and input-level errors.
    Members of one sample must be contiguous, as webdataset requires; a key that reappears later is a new sample
    (and then a duplicate id)."""
    samples: list[TarSample] = []
    errors: list[dict] = []
    key, members = None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                head, base = posixpath.split(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                k = posixpath.join(head, stem)
                if k != key:
                    if key is not None:
                        samples.append(TarSample(key, path, members))
                    key, members = k, {}
                if ext.lower() in _WANTED:
                    members[ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated or damaged tar: keep what was indexed (reading checks every member's size again).
        errors.append({"name": path, "reason": "unreadable tar", "detail": describe(e)})
    if key is not None:
        samples.append(TarSample(key, path, members))
    return samples, errors


def _index(path: str, progress) -> tuple[list[TarSample], list[dict]]:
    return index_tar(path)


class TreeOfLifeTars(ItemSource):
    """Webdataset tars (files, folders, globs or brace patterns) -> train and val by a hash of (seed, key)."""

    name = "treeoflife"

    def __init__(self, inputs: str | list[str], *, val_fraction: float = 0.05, seed: int = 0):
        self.inputs, self.val_fraction, self.seed = inputs, val_fraction, seed
        self.tars: list[str] = []

    def settings(self) -> dict:
        self.tars = find_tars(self.inputs)
        return {"inputs": [[t, os.path.getsize(t)] for t in self.tars], "seed": self.seed}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        indexed = map_ordered(_index, self.tars, workers)
        samples = [s for found, _ in indexed for s in found]
        plan = split_by_id(samples, [s.key for s in samples], self.seed, self.val_fraction)
        plan.input_errors = [e for _, errors in indexed for e in errors]
        return plan

    def load(self, item: TarSample, files: dict) -> Example:
        image_ext = next((e for e in IMAGE_EXTS if e in item.members), None)
        texts = {}
        for ext in TEXT_EXTS:
            if ext in item.members:
                texts[ext] = read_at(files, item.tar, *item.members[ext]).decode("utf-8", "replace")
        taxon = treeoflife_taxon(texts)
        if taxon.empty:
            raise Skip("no taxonomy")
        if image_ext is None:
            raise Skip("missing image")
        return Example(item.key, read_at(files, item.tar, *item.members[image_ext]), taxon)

    def name_of(self, item: TarSample) -> str:
        return f"{item.tar}:{item.key}.{next((e for e in IMAGE_EXTS if e in item.members), 'jpg')}"
