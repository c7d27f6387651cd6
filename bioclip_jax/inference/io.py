"""pybioclip's file formats on the command line: label lists, label bins, subsets and taxa CSVs in; prediction rows
(CSV or a text table) and embeddings out."""

from __future__ import annotations

import csv
import io
import os

from bioclip_jax.data import sources
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError


def read_labels(value: str) -> list[str]:
    """--cls: a file with one label per line, or a comma-separated list."""
    if os.path.isfile(value):
        with open(value) as f:
            return [line.strip() for line in f if line.strip()]
    return [label.strip() for label in value.split(",") if label.strip()]


def read_bins(path: str) -> dict[str, str]:
    """--bins: a CSV whose first column is the label and second the bin (a header row is skipped if it says so)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["cls", "bin"], ["class", "bin"], ["label", "bin"]):
        rows = rows[1:]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) < 2]
    if bad or not rows:
        raise InputError(f"{path}: expected two columns (label, bin) on every row; rows {bad[:10]} have fewer")
    return {row[0].strip(): row[1].strip() for row in rows}


def read_subset(path: str) -> tuple[str, list[str]]:
    """pybioclip's --subset CSV: the header of the first column names the rank, the rows the taxa to keep."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if len(rows) < 2:
        raise InputError(f"{path}: expected a header naming the rank (e.g. 'order') and at least one taxon")
    return rows[0][0].strip().lower(), [row[0] for row in rows[1:]]


def read_taxa(path: str) -> list[Taxon]:
    """make-txt-emb's taxa CSV: columns kingdom, phylum, cls (or class), order, family, genus, species[, common_name],
    read as make-shards reads metadata.csv."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    rename = {"class": "cls"}  # metadata.csv says "cls"; accept the plain word too
    taxa = [sources.row_taxon({rename.get(k.strip(), k.strip()): (v or "") for k, v in row.items() if k})
            for row in rows]
    empty = [i + 2 for i, t in enumerate(taxa) if t.empty]
    if not taxa or empty:
        raise InputError(f"{path}: expected columns kingdom, phylum, cls (or class), order, family, genus, "
                         f"species[, common_name]; rows without any rank: {empty[:10]}")
    return taxa


def format_rows(rows: list[dict], fmt: str) -> str:
    """Prediction rows as CSV (pybioclip's --format csv) or a bordered text table (--format table)."""
    columns = list(rows[0]) if rows else ["file_name", "classification", "score"]
    buf = io.StringIO()
    if fmt == "csv":
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt != "table":
        raise InputError(f"format {fmt!r}: expected 'csv' or 'table'")
    cells = [[f"{r[c]:.6g}" if c == "score" else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt_row(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line, fmt_row(columns), line, *map(fmt_row, cells), line]) + "\n"


def embeddings_json(model_source: str, keys: list[str], features) -> dict:
    """pybioclip's `embed` output: {"model": ..., "embeddings": {image: [floats]}}."""
    return {"model": model_source, "embeddings": {k: [float(v) for v in f] for k, f in zip(keys, features)}}
