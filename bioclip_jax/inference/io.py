"""pybioclip's file formats on the command line: label lists, label bins, subsets and taxa CSVs in; prediction rows
(CSV or a text table) and embeddings out."""

from __future__ import annotations

import csv
import io
import os
import warnings

from bioclip_jax import paths
from bioclip_jax.data.taxonomy import RANKS, Taxon, row_taxon
from bioclip_jax.errors import InputError


class InputWarning(UserWarning):
    """Input that is probably not what the user meant but can still be used (the CLI prints it as one line)."""


# A --cls value with these is meant as a file name, not a label list.
_FILE_SUFFIXES = (".txt", ".csv", ".tsv")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a byte-order mark is dropped, as Excel writes one); other encodings are an InputError naming
    the file and line."""
    data = paths.resolve(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") \
            from None


def _csv_rows(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, [cell.strip() for cell in row]))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: {e}") from None
    return rows


def read_labels(value: str) -> list[str]:
    """--cls: a file with one label per line, or a comma-separated list (as pybioclip: a file wins if it exists).

    Warns (InputWarning) when the value looks like a file name that does not exist, and when there is one label
    only: a softmax over one label gives every image 1.0."""
    if os.path.isfile(value):
        labels = [line.strip() for line in read_text(value).splitlines() if line.strip()]
        if not labels:
            raise InputError(f"{value}: no labels (expected one label per line)")
    else:
        if os.sep in value or "/" in value or value.lower().endswith(_FILE_SUFFIXES):
            warnings.warn(f"--cls {value!r} looks like a file name but there is no such file; using it as a "
                          "comma-separated label list", InputWarning, stacklevel=2)
        labels = [label.strip() for label in value.split(",") if label.strip()]
    if len(labels) == 1:
        warnings.warn(f"only one label ({labels[0]!r}): every image will score 1.0; give two or more labels",
                      InputWarning, stacklevel=2)
    return labels


def read_bins(path: str | os.PathLike) -> dict[str, str]:
    """--bins: a CSV with a header row (always, as pybioclip's `pd.read_csv(index_col=0)`), then label, bin rows;
    further columns are ignored. Errors name the file and line."""
    rows = _csv_rows(path)
    if not rows or len(rows[0][1]) < 2:
        raise InputError(f"{path}: expected a header row and at least two columns (label, bin), e.g. 'label,bin'")
    bins: dict[str, str] = {}
    for line, row in rows[1:]:
        if len(row) < 2 or not row[0] or not row[1]:
            raise InputError(f"{path}: line {line}: expected a label and its bin, got {row}")
        if bins.get(row[0], row[1]) != row[1]:
            raise InputError(f"{path}: line {line}: label {row[0]!r} is in bin {bins[row[0]]!r} already")
        bins[row[0]] = row[1]
    if not bins:
        raise InputError(f"{path}: no label rows after the header")
    return bins


def read_subset(path: str | os.PathLike) -> tuple[str, list[str]]:
    """pybioclip's --subset CSV: the first column's header names the rank, its rows the taxa to keep (at species
    rank, binomials such as 'Ursus arctos')."""
    rows = _csv_rows(path)
    if not rows:
        raise InputError(f"{path}: empty; expected a header naming the rank (e.g. 'order') and taxa below it")
    rank = rows[0][1][0].lower()
    if rank not in RANKS:
        raise InputError(f"The first column of {path} is named '{rank}' but must be one of {','.join(RANKS)}.")
    values = [row[0] for _, row in rows[1:] if row[0]]
    if not values:
        raise InputError(f"{path}: no taxa below the header '{rows[0][1][0]}'")
    return rank, values


def check_output(path: str | None, formats: tuple[str, ...] | None = None) -> str | None:
    """An --output path checked before any work: None (or pybioclip's 'stdout') for standard output. With
    `formats`, its suffix must be one of them (a .parquet output is a folder of parts and may exist already)."""
    if not path or path == "stdout":
        return None
    if paths.is_url(path):
        paths.check_reachable(path)
    else:
        folder_output = bool(formats) and path.rstrip("/").lower().endswith(".parquet")
        if os.path.isdir(path) and not folder_output:
            raise InputError(f"--output {path}: is a directory; expected a file name")
        parent = os.path.dirname(os.path.abspath(path.rstrip("/")))
        if not os.path.isdir(parent):
            raise InputError(f"--output {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise InputError(f"--output {path}: not writable")
    if formats:
        from bioclip_jax.inference.outputs import output_format

        output_format(path, formats)
    return path


def read_taxa(path: str) -> list[Taxon]:
    """make-txt-emb's taxa CSV: columns kingdom, phylum, cls (or class), order, family, genus, species[, common_name],
    read as make-shards reads metadata.csv."""
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    except csv.Error as e:
        raise InputError(f"{path}: {e}") from None
    rename = {"class": "cls"}  # metadata.csv says "cls"; accept the plain word too
    taxa = [row_taxon({rename.get(k.strip(), k.strip()): (v or "") for k, v in row.items() if k})
            for row in rows]
    empty = [i + 2 for i, t in enumerate(taxa) if t.empty]
    if not taxa or empty:
        raise InputError(f"{path}: expected columns kingdom, phylum, cls (or class), order, family, genus, "
                         f"species[, common_name]; rows without any rank: {empty[:10]}")
    return taxa


def format_rows(rows: list[dict], fmt: str, columns: list[str] | None = None) -> str:
    """Prediction rows as CSV (pybioclip's --format csv) or a bordered text table (--format table)."""
    columns = columns or (list(rows[0]) if rows else ["file_name", "classification", "score"])
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
