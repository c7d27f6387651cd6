"""An image folder described by BioCLIP's metadata.csv (filepath, class, optional ranks and common_name) as a
make-shards source; `class` becomes Record.label. With val_fraction=0 it is an evaluation set."""

from __future__ import annotations

import csv
import hashlib
import os

from bioclip_jax.data.taxonomy import RANK_COLUMNS, row_taxon
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
