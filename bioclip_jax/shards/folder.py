"""An image folder described by BioCLIP's metadata.csv (filepath, class, optional ranks and common_name) as a
make-shards source; `class` becomes Record.label. With val_fraction=0 it is an evaluation set."""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import os
import re

from bioclip_jax.data.taxonomy import RANK_COLUMNS, Taxon, row_taxon
from bioclip_jax.errors import InputError
from bioclip_jax.shards.build import Example, Skip
from bioclip_jax.shards.source import ItemSource, Plan, split_by_id

REQUIRED_COLUMNS = ("filepath", "class")
OPTIONAL_COLUMNS = (*RANK_COLUMNS, "common_name")


def read_metadata_csv(path: str) -> tuple[str, list[dict[str, str]]]:
    """BioCLIP's metadata.csv (or a folder holding one) -> (image root folder, rows). Raises InputError naming the
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


class MetadataFolder(ItemSource):
    """metadata.csv (or its folder) -> train and val by a hash of (seed, filepath)."""

    name = "folder"

    def __init__(self, csv_path: str, *, val_fraction: float = 0.05, seed: int = 0):
        csv_path = str(csv_path)
        self.csv_path = os.path.join(csv_path, "metadata.csv") if os.path.isdir(csv_path) else csv_path
        self.val_fraction, self.seed = val_fraction, seed
        self.root = ""
        self._rows: list[dict] | None = None  # read by settings(), handed to plan(): never pickled into jobs

    def settings(self) -> dict:
        self.root, self._rows = read_metadata_csv(self.csv_path)
        with open(self.csv_path, "rb") as f:
            csv_digest = hashlib.sha256(f.read()).hexdigest()  # an edited CSV is another plan
        return {"inputs": os.path.abspath(self.csv_path), "csv_sha256": csv_digest, "seed": self.seed}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        rows, self._rows = self._rows, None
        return split_by_id(rows, [r["filepath"] for r in rows], self.seed, self.val_fraction)

    def load(self, item: dict[str, str], files: dict) -> Example:
        """Rows with a class but no taxonomy are kept: the class label alone is what an evaluation set needs."""
        taxon = row_taxon(item)
        if taxon.empty and not item.get("class"):
            raise Skip("no taxonomy")
        try:
            with open(os.path.join(self.root, item["filepath"]), "rb") as f:
                data = f.read()
        except OSError as e:  # no path in the detail: it is the name
            raise Skip("missing image", f"{type(e).__name__}: {e.strerror or e}") from None
        return Example(item["filepath"], data, taxon, item.get("class", ""))

    def name_of(self, item: dict[str, str]) -> str:
        return item["filepath"]


# ---------------------------------------------------------------------------------- a user's labelled images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HELDOUT_SPLITS = ("val", "test", "heldout")  # values of a CSV's optional `split` column that mean held out
_BINOMIAL = re.compile(r"^[A-Z][a-z]+ [a-z]+(-[a-z]+)?$")


def class_taxon(name: str) -> Taxon:
    """The taxon of a class known only by its name: a binomial ("Pica hudsonia") becomes genus and species, so that
    BioCLIP's scientific and taxonomic captions apply; any other name ("magpie", "site 3 deer") becomes the common
    name, which the "com" captions use. Never an empty caption."""
    name = " ".join(name.split())
    if _BINOMIAL.match(name):
        genus, species = name.split(" ", 1)
        return Taxon(genus=genus, species=species)
    return Taxon(common_name=name)


@dataclasses.dataclass
class LabelledImages:
    """A user's images and classes, read from a folder of class subfolders or a CSV: `rows` ({filepath (absolute),
    class, taxon, split ("" unless the CSV gave one)}, in input order) and `warnings` (one line each: skipped files,
    merged spellings)."""
    rows: list[dict]
    warnings: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted({r["class"] for r in self.rows})

    @property
    def has_ranks(self) -> bool:
        """Every row has taxonomic ranks (the BioCLIP text types all apply), not only a class name."""
        return all(any(r["taxon"].ranks) for r in self.rows)


def read_labelled_images(path: str) -> LabelledImages:
    """A folder of class subfolders (`Pica hudsonia/a.jpg`) or a CSV (filepath plus a `class` column and/or
    kingdom..species columns, common_name optional, `split` optional) -> LabelledImages. Raises InputError for a
    CSV with neither a class nor a rank column, or an input with no images."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "metadata.csv")):
        rows, warnings = _class_folders(path)
    else:
        rows, warnings = _labelled_csv(os.path.join(path, "metadata.csv") if os.path.isdir(path) else path)
    if not rows:
        raise InputError(f"{path}: no images found (expected class subfolders of {', '.join(IMAGE_EXTENSIONS)} "
                         "files, or a CSV with filepath and class columns)")
    warnings += _merge_spellings(rows)
    return LabelledImages(rows, warnings)


def _class_folders(root: str) -> tuple[list[dict], list[str]]:
    rows, other, loose = [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose.append(entry.name)
            continue
        for folder, dirs, names in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                file = os.path.join(folder, name)
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rows.append({"filepath": os.path.abspath(file), "class": " ".join(entry.name.split()),
                                 "taxon": class_taxon(entry.name), "split": ""})
                else:
                    other.append(os.path.relpath(file, root))
    warnings = []
    if other:
        warnings.append(f"{root}: skipped {len(other)} file(s) that are not images by their extension "
                        f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})")
    if loose:
        warnings.append(f"{root}: skipped {len(loose)} file(s) outside class subfolders ({', '.join(loose[:3])}"
                        f"{', ...' if len(loose) > 3 else ''}); a class is a subfolder")
    return rows, warnings


def _labelled_csv(path: str) -> tuple[list[dict], list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such CSV or folder: {path!r}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        table = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    ranks = [c for c in RANK_COLUMNS if c in columns]
    if "filepath" not in columns or ("class" not in columns and not ranks):
        raise InputError(f"{path}: expected a filepath column and a class column (or taxonomic rank columns "
                         f"{', '.join(RANK_COLUMNS)}); found: {', '.join(columns) or 'none'}")
    root, rows, unnamed, other = os.path.dirname(os.path.abspath(path)), [], 0, []
    for row in table:
        taxon = row_taxon(row)
        label = " ".join(row.get("class", "").split()) or taxon.taxonomic_name
        if not label or not row["filepath"]:
            unnamed += 1
            continue
        if not row["filepath"].lower().endswith(IMAGE_EXTENSIONS):
            other.append(row["filepath"])
            continue
        rows.append({"filepath": os.path.join(root, row["filepath"]), "class": label,
                     "taxon": taxon if any(taxon.ranks) else class_taxon(label),
                     "split": "val" if row.get("split", "").lower() in HELDOUT_SPLITS else row.get("split", "")})
    warnings = [f"{path}: skipped {unnamed} row(s) with no filepath or no class"] if unnamed else []
    if other:
        warnings.append(f"{path}: skipped {len(other)} row(s) whose file is not an image by its extension "
                        f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})")
    return rows, warnings


def _merge_spellings(rows: list[dict]) -> list[str]:
    """Classes that differ only in case or whitespace ("Pica hudsonia", "pica  hudsonia") are one class, named by
    its most frequent spelling; each merge is a warning naming the spellings."""
    spellings: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        spellings[r["class"].casefold()][r["class"]] += 1
    warnings, canonical = [], {}
    for key, counts in spellings.items():
        name = counts.most_common(1)[0][0]
        canonical[key] = name
        if len(counts) > 1:
            warnings.append(f"class {name!r} is spelled {len(counts)} ways ({', '.join(map(repr, counts))}): "
                            f"merged as {name!r}")
    for r in rows:
        name = canonical[r["class"].casefold()]
        if r["class"] != name:
            r["class"] = name
            if not any(r["taxon"].ranks):
                r["taxon"] = class_taxon(name)
    return warnings


def stratified_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """(train, held out, warnings): per class, the images with the smallest hash of (seed, filepath) are held out,
    round(n x fraction) of them but at least one and never all (a class with one image trains and is not
    evaluated). Rows whose CSV gave a split keep it; a class only in the held-out split is a warning."""
    by_class: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_class[r["class"]].append(r)
    train, held, warnings = [], [], []
    for name in sorted(by_class):
        members = by_class[name]
        given = [r for r in members if r["split"]]
        if given:
            train += [r for r in members if r["split"] != "val"]
            held += [r for r in members if r["split"] == "val"]
            if all(r["split"] == "val" for r in members):
                warnings.append(f"class {name!r} has images only in the held-out split: the fine-tune never "
                                "trains on it (evaluated only)")
            continue
        order = sorted(members, key=lambda r: hashlib.sha256(f"{seed}\0{r['filepath']}".encode()).digest())
        n_held = min(len(order) - 1, max(1, round(len(order) * fraction)))
        if len(order) == 1:
            warnings.append(f"class {name!r} has only 1 image ({order[0]['filepath']}): it trains, but nothing of "
                            "it is held out to evaluate")
        held += order[:n_held]
        train += order[n_held:]
    return train, held, warnings


class LabelledSource(ItemSource):
    """A user's labelled images, already split (`stratified_split`) -> train and val shards: the class is
    Record.label, the taxon its ranks or (`class_taxon`) its name."""

    name = "folder"
    val_fraction = None

    def __init__(self, splits: dict[str, list[dict]]):
        self._splits: dict[str, list[dict]] | None = splits  # handed to plan(): never pickled into jobs
        listing = [(s, r["filepath"], r["class"], r["taxon"].ranks, r["taxon"].common_name)
                   for s, rows in splits.items() for r in rows]
        self._digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()  # another split is another output

    def settings(self) -> dict:
        return {"inputs": "labelled images", "rows_sha256": self._digest}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        splits, self._splits = self._splits, None
        return Plan({split: [rows] for split, rows in splits.items()})

    def load(self, item: dict, files: dict) -> Example:
        try:
            with open(item["filepath"], "rb") as f:
                data = f.read()
        except OSError as e:
            raise Skip("missing image", f"{type(e).__name__}: {e.strerror or e}") from None
        return Example(item["filepath"], data, item["taxon"], item["class"])

    def name_of(self, item: dict) -> str:
        return item["filepath"]
