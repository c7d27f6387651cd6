"""Where `embed` and `predict` write: a folder of Parquet parts (emb-explorer's layout: `uuid`, `emb` as
list<float32>, `file_name`, the carried columns), resumable, local or gs://; and, assembled from those parts for
smaller jobs, one .npy (+ ids), .csv or .json file. The output's suffix chooses the format.

A part folder holds:
    _manifest.json           the job (model, inputs, settings): a rerun must match it, another job is refused
    part-00012.parquet       the rows of items [12 * part_size, 13 * part_size), written under a temporary name first
    _done/part-00012.json    the part's row count and failures, written after its Parquet file: the part is finished
    _failures.csv            every input that could not be read (file_name, error), once all parts are finished
                             (single-file outputs: NAME.failures.csv beside NAME.npy / .csv / .json)
Names that start with "_" are skipped by pyarrow and pandas, so `pandas.read_parquet(folder)` reads the parts alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from typing import Iterator

import numpy as np

from bioclip_jax import paths
from bioclip_jax.errors import InputError

FORMATS = (".parquet", ".npy", ".csv", ".json")
ID_COLUMN, EMB_COLUMN, FILE_COLUMN = "uuid", "emb", "file_name"  # emb-explorer's layout; search reads these names
ID_COLUMNS = (ID_COLUMN, "id")  # what names the rows of a listing or an index: embed's own, or a hand-made `id`
MANIFEST, DONE, FAILURES = "_manifest.json", "_done", "_failures.csv"
MANIFEST_VERSION = 1


def output_format(output: str, allowed: tuple[str, ...] = FORMATS) -> str:
    """The format an --output names by its suffix (".parquet", ".npy", ".csv" or ".json"); anything else is refused,
    never guessed."""
    suffix = os.path.splitext(os.fspath(output).rstrip("/"))[1].lower()
    if suffix not in allowed:
        raise InputError(f"--output {output}: the suffix chooses the format; expected one of {', '.join(allowed)} "
                         f"(got {suffix or 'no suffix'})")
    return suffix


def job_manifest(command: str, model: dict, settings: dict) -> dict:
    """What a part folder's manifest records of its job (PartStore adds "version" and "inputs"): the model (its
    "source": where it was loaded from) and the settings (embed's "preprocess"); search reads them back with
    `manifest_source` and `manifest_preprocess`."""
    return {"command": command, "model": model, "settings": settings}


def manifest_source(manifest: dict) -> str | None:
    """The model that wrote a part folder (a hand-made manifest may give the source as a plain string)."""
    model = manifest.get("model")
    return model.get("source") if isinstance(model, dict) else model


def manifest_preprocess(manifest: dict) -> dict | None:
    """embed's image preprocessing (data.transforms.Preprocess's fields), from a part folder's manifest."""
    return (manifest.get("settings") or {}).get("preprocess")


def parts_folder(output: str) -> str:
    """.parquet outputs are the part folder itself; other formats assemble from a folder beside them."""
    output = os.fspath(output).rstrip("/")
    return output if output.lower().endswith(".parquet") else output + ".parts"


class PartStore:
    """A resumable folder of Parquet parts (see the module docstring). Every host writes its own parts; a part is
    finished when its record in _done/ exists, so a host killed at any moment loses only the part it was writing."""

    def __init__(self, folder: str, job: dict):
        self.folder = paths.resolve(folder)
        self.job = {"version": MANIFEST_VERSION, **job}
        self._done = self.folder / DONE

    def open(self, process_index: int = 0) -> None:
        """Creates the folder and manifest, or checks a rerun against the manifest; another job's folder and a
        folder of other files are refused in one line."""
        manifest = self.folder / MANIFEST
        if manifest.exists():
            self._check(json.loads(manifest.read_text()))
        elif self.folder.exists() and any(not p.name.startswith((".", "_")) for p in self.folder.iterdir()):
            raise InputError(f"{self.folder}: exists and is not an output folder of embed or predict (no {MANIFEST}); "
                             "choose another --output")
        paths.make_dirs(self._done)
        if not manifest.exists():  # every host writes the same text; a temporary name of its own avoids a torn file
            tmp = self.folder / f".{MANIFEST}.{process_index}.tmp"
            tmp.write_text(json.dumps(self.job, indent=1, sort_keys=True))
            tmp.replace(manifest)

    def _check(self, found: dict) -> None:
        for key, what in (("model", "another model's"), ("command", "another command's"),
                          ("inputs", "another input list's"), ("settings", "other settings'")):
            if found.get(key) != self.job.get(key):
                raise InputError(f"{self.folder}: holds {what} parts ({key}: {_short(found.get(key))}, this run: "
                                 f"{_short(self.job.get(key))}); choose another --output or delete the folder")
        if found != self.job:
            raise InputError(f"{self.folder}: its {MANIFEST} differs from this run's; choose another --output")

    def part_name(self, part: int) -> str:
        return f"part-{part:05d}"

    def done(self, part: int) -> dict | None:
        record = self._done / f"{self.part_name(part)}.json"
        return json.loads(record.read_text()) if record.exists() else None

    def write(self, part: int, table, failures: dict[str, str]) -> None:
        """The part's rows (a pyarrow Table; none: no Parquet file) and failures, each file atomically."""
        import pyarrow.parquet as pq

        if table is not None and table.num_rows:
            buf = io.BytesIO()
            pq.write_table(table, buf)
            paths.write_atomic(self.folder / f"{self.part_name(part)}.parquet", buf.getvalue())
        rows = table.num_rows if table is not None else 0
        paths.write_atomic(self._done / f"{self.part_name(part)}.json",
                           json.dumps({"rows": rows, "failures": failures}).encode())

    def iter_tables(self, parts: int) -> Iterator:
        """Every finished part's rows, in part order (the input order)."""
        import pyarrow.parquet as pq

        for part in range(parts):
            path = self.folder / f"{self.part_name(part)}.parquet"
            if (self.done(part) or {}).get("rows"):
                yield pq.read_table(io.BytesIO(path.read_bytes()))

    def write_failures(self, failures: dict[str, str], path: str | None = None) -> str | None:
        """A CSV (file_name, error) of the inputs that failed, by default the folder's _failures.csv -> its path,
        None when nothing failed."""
        path = paths.resolve(path) if path else self.folder / FAILURES
        if not failures:
            path.unlink(missing_ok=True)
            return None
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([FILE_COLUMN, "error"])
        writer.writerows(failures.items())
        paths.write_atomic(path, buf.getvalue().encode())
        return str(path)

    def remove(self) -> None:
        if paths.is_url(self.folder):
            self.folder.rmtree()
        else:
            shutil.rmtree(self.folder)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ------------------------------------------------------------------------------------- single files from the parts
def assemble(store: PartStore, parts: int, output: str, fmt: str, model_source: str) -> int:
    """Writes the finished parts as one .npy (+ NAME.ids.csv), .csv or .json file, atomically -> rows written
    (nothing is written for none)."""
    tables = list(store.iter_tables(parts))
    rows = sum(t.num_rows for t in tables)
    if not rows:
        return 0
    target = paths.resolve(output)
    if fmt == ".npy":
        _write_npy(tables, target)
        _write_csv([t.drop_columns([EMB_COLUMN]) for t in tables], paths.resolve(_ids_path(output)))
    elif fmt == ".csv":
        _write_csv(tables, target)
    else:
        _write_json(tables, target, model_source)
    return rows


def _ids_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".ids.csv"


def _write_npy(tables, target) -> None:
    rows = sum(t.num_rows for t in tables)
    width = len(tables[0].column(EMB_COLUMN)[0])
    dtype = np.float16 if str(tables[0].schema.field(EMB_COLUMN).type.value_type) == "halffloat" else np.float32
    if paths.is_url(target):
        out = np.empty((rows, width), dtype)
    else:  # memory-mapped: a file larger than memory is written one part at a time
        tmp = str(target) + ".tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, width))
    start = 0
    for t in tables:
        out[start:start + t.num_rows] = _emb_matrix(t, dtype)
        start += t.num_rows
    if paths.is_url(target):
        buf = io.BytesIO()
        np.save(buf, out)
        paths.write_atomic(target, buf.getvalue())
    else:
        out.flush()
        del out
        os.replace(tmp, target)


def _emb_matrix(table, dtype=np.float32) -> np.ndarray:
    column = table.column(EMB_COLUMN).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(dtype, copy=False)


def _write_csv(tables, target) -> None:
    """Columns as in the parts; an `emb` list becomes emb_0 ... emb_{D-1}."""
    buf = io.StringIO()
    writer = None
    for t in tables:
        names = [n for n in t.column_names if n != EMB_COLUMN]
        emb = _emb_matrix(t) if EMB_COLUMN in t.column_names else None
        if writer is None:
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(names + ([f"emb_{i}" for i in range(emb.shape[1])] if emb is not None else []))
        columns = [t.column(n).to_pylist() for n in names]
        for i in range(t.num_rows):
            row = ["" if c[i] is None else c[i] for c in columns]
            writer.writerow(row + ([repr(float(v)) for v in emb[i]] if emb is not None else []))
    paths.write_atomic(target, buf.getvalue().encode())


def _write_json(tables, target, model_source: str) -> None:
    """Embeddings: pybioclip's {"model", "embeddings": {id: [floats]}}; prediction rows: a list of objects."""
    if EMB_COLUMN in tables[0].column_names:
        embeddings = {}
        for t in tables:
            for item_id, vector in zip(t.column(ID_COLUMN).to_pylist(), _emb_matrix(t)):
                embeddings[item_id] = [float(v) for v in vector]
        text = json.dumps({"model": model_source, "embeddings": embeddings}, indent=4)
    else:
        text = json.dumps([row for t in tables for row in t.to_pylist()], indent=1)
    paths.write_atomic(target, (text + "\n").encode())
