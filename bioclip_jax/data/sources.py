"""Raw inputs for the shard writers: image re-encoding, TreeOfLife-10M webdataset tars and image folders with a
BioCLIP `metadata.csv`. Everything here works on one sample at a time; planning and writing live in writers.py.

Taxonomy parsing follows how BioCLIP's TreeOfLife-10M writer produced its text files (see docs/data_format.md):
`taxonomic_name.txt` drops missing ranks, so only `taxonTag.txt` ("kingdom Animalia phylum ...") places every rank
exactly; `common_name.txt` holds the scientific (else taxonomic) name when no common name existed.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import posixpath
import re
import tarfile
from typing import NamedTuple

from PIL import Image

from bioclip_jax.data.taxonomy import RANK_COLUMNS, RANKS, Taxon
from bioclip_jax.data.transforms import ImageTooLarge, decode_image, to_rgb
from bioclip_jax.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# webdataset keys/extensions: the key is the member path up to the first "." of its file name, the extension (lower
# cased, as webdataset does) is the rest. Only these members are kept in the index; the other caption files are
# derived from them by BioCLIP and carry no extra information.
TEXT_EXTS = ("taxontag.txt", "taxontag_com.txt", "taxonomic_name.txt", "taxon.txt", "scientific_name.txt",
             "sci.txt", "common_name.txt", "com.txt")
_WANTED = frozenset(IMAGE_EXTS + TEXT_EXTS)


class Skip(Exception):
    """A sample that cannot become a record: `reason` is a short stable key counted in summaries."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------- images


def describe(e: BaseException) -> str:
    """An exception as one line, without the object addresses PIL puts in messages (summaries must not change
    from run to run)."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")


def encode_image(src: bytes | Image.Image, *, resize: int | None = None, quality: int = 95) -> bytes:
    """Image bytes (any format PIL reads) or a PIL image -> RGB JPEG bytes, optionally squashed to resize x resize
    (bicubic, aspect not kept, as BioCLIP's shards). Raises Skip for undecodable or truncated data.

    An RGB JPEG that is not resized is stored byte for byte: re-encoding would only lose quality."""
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            img = decode_image(src, "image")  # decode everything now, not later in a training worker
        except ImageTooLarge as e:
            raise Skip("image too large", str(e).removeprefix("image: ")) from None
        except InputError as e:
            raise Skip("undecodable image", describe(e.__cause__)) from None
        if img.format == "JPEG" and img.mode == "RGB" and not resize:
            return bytes(src)
    try:
        img = to_rgb(img)
        if resize and img.size != (resize, resize):
            img = img.resize((resize, resize), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    except Exception as e:  # e.g. a mode PIL cannot convert to RGB
        raise Skip("undecodable image", describe(e)) from None
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------- taxonomy


def strip_caption(text: str | None) -> str:
    """"a photo of X." -> "X" (BioCLIP's caption files); plain names pass through."""
    text = (text or "").strip()
    if text.lower().startswith("a photo of "):
        text = text[len("a photo of "):]
    return text[:-1].strip() if text.endswith(".") else text


def _epithet(genus: str, species: str) -> str:
    """The species epithet alone, also when a binomial "Pica hudsonia" was given."""
    parts = species.split()
    if len(parts) > 1 and genus and parts[0].lower() == genus.lower():
        return " ".join(parts[1:])
    return species


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
    ranks[6] = _epithet(ranks[5], ranks[6])
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


def _is_fallback_common(common: str, names: list[str]) -> bool:
    """BioCLIP wrote the scientific or taxonomic name into common_name.txt when there was no common name."""
    key = " ".join(common.split()).lower()
    return not key or any(key == " ".join(n.split()).lower() for n in names if n)


def treeoflife_taxon(texts: dict[str, str]) -> Taxon:
    """Taxon from one sample's text files (keys: lower-cased extensions such as "taxontag.txt")."""
    def get(*exts: str) -> str:  # the first non-empty file of these, caption wording removed
        return next((strip_caption(texts[e]) for e in exts if texts.get(e, "").strip()), "")

    tagged = get("taxontag.txt", "taxontag_com.txt")
    taxonomic, scientific = get("taxonomic_name.txt", "taxon.txt"), get("scientific_name.txt", "sci.txt")
    common = get("common_name.txt", "com.txt").split(" with common name ")[0]
    ranks = (parse_tagged(tagged) if tagged else None) or parse_positional(taxonomic, scientific)
    taxon = Taxon.from_ranks(ranks)
    if _is_fallback_common(common, [scientific, taxonomic, taxon.scientific_name, taxon.taxonomic_name]):
        common = ""
    return Taxon.from_ranks(ranks, common)


def row_taxon(row: dict[str, str]) -> Taxon:
    """Taxon from a metadata.csv row (optional columns kingdom..species, common_name; species may be a binomial)."""
    ranks = [(row.get(c) or "").strip() for c in RANK_COLUMNS]
    if not ranks[5] and len(ranks[6].split()) > 1 and ranks[6][:1].isupper():
        ranks[5] = ranks[6].split()[0]  # "Pica hudsonia" in the species column, no genus column
    ranks[6] = _epithet(ranks[5], ranks[6])
    taxon = Taxon.from_ranks(ranks)
    common = (row.get("common_name") or "").strip()
    if _is_fallback_common(common, [taxon.scientific_name, taxon.taxonomic_name]):
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


def read_at(files: dict, path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of `path`; `files` caches open files (one shard reads many members of a tar)."""
    if path not in files:
        files[path] = open(path, "rb")
    f = files[path]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise Skip("truncated member", f"{len(data)} of {size} bytes")
    return data


def load_tar_sample(sample: TarSample, files: dict, resize: int | None, quality: int) -> tuple[bytes, Taxon]:
    """-> (JPEG bytes, taxon), or raises Skip. `files` caches the open tar files of one shard."""
    image_ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
    texts = {}
    for ext in TEXT_EXTS:
        if ext in sample.members:
            texts[ext] = read_at(files, sample.tar, *sample.members[ext]).decode("utf-8", "replace")
    taxon = treeoflife_taxon(texts)
    if taxon.empty:
        raise Skip("no taxonomy")
    if image_ext is None:
        raise Skip("missing image")
    return encode_image(read_at(files, sample.tar, *sample.members[image_ext]), resize=resize,
                        quality=quality), taxon


# ----------------------------------------------------------------------------------------------------- folders

REQUIRED_COLUMNS = ("filepath", "class")
OPTIONAL_COLUMNS = (*RANK_COLUMNS, "common_name")


def read_metadata_csv(path: str) -> tuple[str, list[dict[str, str]]]:
    """BioCLIP's metadata.csv (or a folder holding one) -> (image root folder, rows). Raises ValueError naming the
    missing required columns."""
    path = os.path.join(path, "metadata.csv") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metadata CSV at {path!r}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{path}: missing required column(s) {', '.join(missing)} (found: "
                             f"{', '.join(columns) or 'none'}; optional: {', '.join(OPTIONAL_COLUMNS)})")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return os.path.dirname(os.path.abspath(path)), rows


def load_folder_row(root: str, row: dict[str, str], resize: int | None, quality: int) -> tuple[bytes, Taxon]:
    """-> (JPEG bytes, taxon), or raises Skip. Rows with a class but no taxonomy are kept: the
    class label alone is what an evaluation set needs."""
    taxon = row_taxon(row)
    if taxon.empty and not row.get("class"):
        raise Skip("no taxonomy")
    try:
        with open(os.path.join(root, row["filepath"]), "rb") as f:
            data = f.read()
    except OSError as e:
        raise Skip("missing image", f"{type(e).__name__}: {e.strerror or e}") from None  # no path: it is the name
    return encode_image(data, resize=resize, quality=quality), taxon
