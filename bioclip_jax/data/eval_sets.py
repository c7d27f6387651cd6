"""BioCLIP's evaluation tasks as they are published, read from their folders (host only: no TFDS, no TensorFlow).

One reader for every published layout; the CSV's columns decide which one applies:

- BioCLIP's annotation files (Imageomics/bioclip data/annotation), `<task>/metadata.csv`:
  Meta-Album tasks `,filepath,class` and `rare_species/metadata.csv`
  `,kingdom,phylum,cls,order,family,genus,species,common_name,filepath,class` (the unnamed first column is pandas'
  index and is ignored). Required: `filepath` (relative to the folder) and `class`; optional: the ranks
  kingdom..species (`cls` is the taxonomic class, `class` the label), `common_name` and `subspecies`.
- The Hugging Face Rare Species repository (imageomics/rare-species): `metadata/rarespecies-catalog.csv` (or one at
  the folder's top), columns `rarespecies_id, eol_content_id, eol_page_id, kingdom, phylum, class, order, family,
  genus, species, sciName, common`, where `class` is the TAXONOMIC class. The catalog names no image file, so an
  image is matched to its row by the `<eol_content_id>_<eol_page_id>` that starts its file name
  (`<eol_content_id>_<eol_page_id>_eol_full-size-copy.jpg`, anywhere under the folder: the dataset card shows them in
  one folder per species, `<kingdom-phylum-...-species>/`, whose exact spelling is not relied on). A `file_name` or
  `filepath` column, where present, is used instead. The label is `sciName`, as the `class` column of BioCLIP's own
  rare_species/metadata.csv ("Cyclonaias tuberculata").

Task folders as published: Birds 525 ships as `kaggle_bird/`, the Meta-Album tasks as `PLK_Mini/` etc., Rare Species
as `rare_species/` (BioCLIP's CSV) or `rare-species/` (a clone of the Hugging Face repository); `TASK_FOLDERS` lists
the names tried for each task.

Every row becomes an `EvalRow`; `FolderEvalSource` serves them as the dicts of `records.decode_record`
({"id", "image", "ranks", "common", "label"}) in CSV order, so it plugs into the evaluation pipeline.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re

from etils import epath

from bioclip_jax.data.taxonomy import EVAL_TEXT_TYPES, RANK_COLUMNS, Taxon, eval_class_name, row_taxon
from bioclip_jax.errors import InputError

log = logging.getLogger(__name__)

# task -> the folder names tried, the published one first.
TASK_FOLDERS = {
    "birds_525": ("kaggle_bird", "birds_525"), "plankton": ("PLK_Mini",), "insects": ("INS_Mini",),
    "insects_2": ("INS_2_Mini",), "plantnet": ("PLT_NET_Mini",), "fungi": ("FNG_Mini",),
    "plantvillage": ("PLT_VIL_Mini",), "medicinal_leaf": ("MED_LF_Mini",), "plantdoc": ("PLT_DOC_Mini",),
    "rare_species": ("rare_species", "rare-species"),
}
# Where a task folder keeps its CSV, in the order tried.
CSV_NAMES = ("metadata.csv", "metadata/rarespecies-catalog.csv", "rarespecies-catalog.csv")

BIOCLIP_COLUMNS = ("filepath", "class")
HF_RARE_SPECIES_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species", "sciName", "common")
LAYOUTS = {
    "bioclip": f"BioCLIP's metadata.csv ({', '.join(BIOCLIP_COLUMNS)}[, {', '.join(RANK_COLUMNS)}, "
               "common_name, subspecies])",
    "hf_rare_species": f"Hugging Face rare-species rarespecies-catalog.csv ({', '.join(HF_RARE_SPECIES_COLUMNS)}, "
                       "and eol_content_id, eol_page_id or file_name)",
}
# `<eol_content_id>_<eol_page_id>_eol_full-size-copy.jpg` (the Hugging Face files); BioCLIP's own CSV spells it
# `..._eol-full-size-copy.jpg`, so either separator is accepted.
_EOL_FILE = re.compile(r"^(\d+)_(\d+)_eol[-_]full-size-copy\.jpe?g$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One image of an evaluation task, with its CSV fields as given (stripped)."""

    filepath: str                 # relative to the task folder: the example's id
    class_name: str               # the label (BioCLIP's `class` column; `sciName` in the Hugging Face catalog)
    ranks: tuple[str, ...]        # kingdom..species epithet (a binomial species column is split as make-shards does)
    common: str = ""              # the common name exactly as written (no fallback)
    subspecies: str = ""

    @property
    def taxon(self) -> Taxon:
        return Taxon.from_ranks(self.ranks, self.common)

    @property
    def has_taxonomy(self) -> bool:
        return any(self.ranks) or bool(self.common or self.subspecies)

    def eval_name(self, text_type: str) -> str:
        """The class name BioCLIP's evaluation gives this row (`taxonomy.eval_class_name`); "asis" is the label.
        A row without any taxonomy (Meta-Album's `,filepath,class`) keeps its label under every text type, as running
        BioCLIP's evaluation on such a task with `--text_type asis` does (any other type would name every class alike
        there)."""
        if text_type not in EVAL_TEXT_TYPES:
            raise InputError(f"unknown evaluation text type {text_type!r}; expected one of {EVAL_TEXT_TYPES}")
        if text_type == "asis" or not self.has_taxonomy:
            return self.class_name
        return eval_class_name(self.taxon, text_type, self.subspecies)

    def example(self, image: bytes) -> dict:
        """The plain dict the evaluation pipeline consumes (the same keys as records.decode_record)."""
        return {"id": self.filepath, "image": image, "ranks": self.ranks, "common": self.common,
                "label": self.class_name}


def find_task_csv(folder: str | os.PathLike) -> epath.Path | None:
    """The task CSV of a folder (CSV_NAMES, in order), or None."""
    folder = epath.Path(folder)
    return next((folder / name for name in CSV_NAMES if (folder / name).is_file()), None)


def _read_csv(path: epath.Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_bytes().decode("utf-8-sig")  # -sig: spreadsheets often write a BOM
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [(c or "").strip() for c in reader.fieldnames or []]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return columns, rows


def detect_layout(path: str | os.PathLike, columns: list[str]) -> str:
    """The layout whose columns `columns` has; a ValueError naming the file, its columns and the layouts otherwise.
    The Hugging Face catalog is recognised first: its `class` is a rank, not a label."""
    if all(c in columns for c in HF_RARE_SPECIES_COLUMNS) and (
            {"eol_content_id", "eol_page_id"} <= set(columns) or {"file_name", "filepath"} & set(columns)):
        return "hf_rare_species"
    if all(c in columns for c in BIOCLIP_COLUMNS):
        return "bioclip"
    found = ", ".join(c if c else "(unnamed)" for c in columns) or "none"
    raise InputError(f"{path}: columns ({found}) match no evaluation-task layout; expected "
                     + " or ".join(LAYOUTS.values()))


def _bioclip_row(cells: dict[str, str]) -> EvalRow:
    taxon = row_taxon(cells)  # ranks as make-shards reads them; its common-name fallback is not used here
    return EvalRow(filepath=cells["filepath"], class_name=cells["class"], ranks=dataclasses.astuple(taxon)[:7],
                   common=cells.get("common_name", ""), subspecies=cells.get("subspecies", ""))


def _files_under(root: epath.Path, prefix: str = "") -> list[tuple[str, str]]:
    """(file name, path relative to root) of every file below root, in sorted order (epath has no recursive glob)."""
    out = []
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            out += _files_under(child, rel + "/")
        else:
            out.append((child.name, rel))
    return out


def _hf_rows(folder: epath.Path, csv_path: epath.Path, cells: list[dict[str, str]]) -> list[EvalRow]:
    path_column = next((c for c in ("file_name", "filepath") if cells and c in cells[0]), None)
    if path_column:  # relative to the CSV's folder (Hugging Face imagefolder convention)
        base = os.path.relpath(os.fspath(csv_path.parent), os.fspath(folder))
        paths = [os.path.normpath(os.path.join(base, c[path_column])) for c in cells]
    else:
        by_id = {}
        for name, rel in _files_under(folder):
            m = _EOL_FILE.match(name)
            if m and m.groups() not in by_id:
                by_id[m.groups()] = rel
        # A row without a file keeps the name it would have, so the missing-image warning can name it.
        paths = [by_id.get((c["eol_content_id"], c["eol_page_id"]),
                           f"{c['eol_content_id']}_{c['eol_page_id']}_eol_full-size-copy.jpg") for c in cells]
    rows = []
    for c, path in zip(cells, paths):
        taxon = row_taxon({"kingdom": c["kingdom"], "phylum": c["phylum"], "cls": c["class"],
                                   "order": c["order"], "family": c["family"], "genus": c["genus"],
                                   "species": c["species"]})
        rows.append(EvalRow(filepath=path, class_name=c["sciName"], ranks=dataclasses.astuple(taxon)[:7],
                            common=c["common"], subspecies=c.get("subspecies", "")))
    return rows


def read_task(folder: str | os.PathLike) -> tuple[list[EvalRow], str, epath.Path]:
    """Every row of a task folder's CSV, in CSV order (missing images included) -> (rows, layout, CSV path). The
    first of CSV_NAMES whose columns match a layout is read (a clone of the Hugging Face repository may also hold a
    top-level metadata.csv of its own); if none matches, the error names the first one found."""
    folder = epath.Path(folder)
    candidates = [folder / name for name in CSV_NAMES if (folder / name).is_file()]
    if not candidates:
        raise FileNotFoundError(f"no task CSV in {folder}: expected one of {', '.join(CSV_NAMES)}")
    first_error = None
    for csv_path in candidates:
        columns, cells = _read_csv(csv_path)
        try:
            layout = detect_layout(csv_path, columns)
        except ValueError as e:
            first_error = first_error or e
            continue
        rows = _hf_rows(folder, csv_path, cells) if layout == "hf_rare_species" else [_bioclip_row(c) for c in cells]
        return rows, layout, csv_path
    raise first_error


def first_appearance(values) -> list:
    """Distinct values in order of first appearance (pandas' `unique()`, which BioCLIP's class lists use)."""
    return list(dict.fromkeys(values))


def read_metadata(folder: str | os.PathLike) -> tuple[list[EvalRow], list[str]]:
    """A task folder -> (rows whose image file exists, in CSV order; class labels in order of first appearance).

    Labels come from every row, including rows whose image is missing, so a missing file never renumbers the
    classes of a task. Missing images are skipped with one warning listing them."""
    folder = epath.Path(folder)
    rows, _, csv_path = read_task(folder)
    class_names = first_appearance(r.class_name for r in rows)
    missing = [r.filepath for r in rows if not (folder / r.filepath).is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        log.warning("%s: skipping %d row(s) whose image file is missing: %s", csv_path, len(missing), shown)
        missing_set = set(missing)
        rows = [r for r in rows if r.filepath not in missing_set]
    return rows, class_names


class FolderEvalSource:
    """An evaluation task read straight from its folder: `len`, `[i] -> dict`, `rows`, `class_names`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = epath.Path(folder)
        self.rows, self.class_names = read_metadata(self.folder)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return row.example((self.folder / row.filepath).read_bytes())
