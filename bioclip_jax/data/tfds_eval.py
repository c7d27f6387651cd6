"""BioCLIP's evaluation sets as a TensorFlow Datasets builder (built and read without TensorFlow).

The task folders are read by `bioclip_jax.data.eval_sets` (every published layout: BioCLIP's metadata.csv files,
Meta-Album's `,filepath,class`, `kaggle_bird/`, the Hugging Face rare-species catalog). Users download the folders
themselves (no network here) and put them under one `manual_dir`:

    manual_dir/PLK_Mini/metadata.csv, manual_dir/PLK_Mini/<images>, manual_dir/kaggle_bird/...,
    manual_dir/rare_species/...

    builder = build("plankton", manual_dir, data_dir)   # writes data_dir/bioclip_eval/plankton/1.1.0/*.array_record
    source = EvalSetSource("plankton", data_dir)        # random access, a Grain MapDataset source
    source = eval_sets.FolderEvalSource(manual_dir / "PLK_Mini")  # the same examples, without TFDS

Both sources yield exactly the dict of `bioclip_jax.data.records.decode_record`: {"id": filepath, "image": the file's
bytes, "ranks": 7 str ("" where unknown), "common": the common name as written, "label": the class name}, in CSV
order, and both have `rows` (eval_sets.EvalRow, for BioCLIP's class naming) and `class_names` (order of first
appearance).

The sub-folder of a task can be overridden (`build(..., folder="MyPlankton")`), a `manual_dir` that holds the task's
CSV itself is used as is, and the `custom` config reads any folder laid out this way.

Why it works without TensorFlow: `file_format="array_record"` (TFRecord writing and `as_dataset` need TF;
ArrayRecord + `tfds.data_source` do not), images are stored as opaque bytes, and statistics are not computed (that
needs TF).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bioclip_jax.data.eval_sets import CSV_NAMES, TASK_FOLDERS, EvalRow, FolderEvalSource, find_task_csv, read_metadata
from bioclip_jax.data.taxonomy import RANK_COLUMNS

__all__ = ["TASK_FOLDERS", "FolderEvalSource", "BioclipEvalSet", "EvalSetSource", "build"]


class BioclipEvalConfig(tfds.core.BuilderConfig):
    """One evaluation task; `folders` are the sub-folders of manual_dir it tries, the published name (`folder`)
    first (none = manual_dir itself)."""

    def __init__(self, *, folders: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.folders = tuple(folders)

    @property
    def folder(self) -> str:
        return self.folders[0] if self.folders else ""


class BioclipEvalSet(tfds.core.GeneratorBasedBuilder):
    """BioCLIP's 10 evaluation tasks (+ `custom`), one config each, a single `test` split."""

    name = "bioclip_eval"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release: images kept as their original encoded bytes.",
                     "1.1.0": "Common names as written (no fallback), a subspecies feature, labels in order of first "
                              "appearance, every published task layout (eval_sets)."}
    BUILDER_CONFIGS = [BioclipEvalConfig(name=task, folders=folders, description=f"BioCLIP eval task {task}")
                       for task, folders in TASK_FOLDERS.items()]
    BUILDER_CONFIGS.append(BioclipEvalConfig(name="custom", folders=(),
                                             description="any task folder eval_sets reads (manual_dir is the folder)"))
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download the evaluation folders (each with one of {', '.join(CSV_NAMES)}) and place them under "
        "manual_dir: " + ", ".join(f"{t}: {' or '.join(f + '/' for f in fs)}" for t, fs in TASK_FOLDERS.items())
        + ". For `custom`, manual_dir is the folder itself.")

    def __init__(self, *, folder: str | None = None, file_format: str = "array_record", **kwargs):
        # `folder` overrides the config's sub-folder name for building (it does not change what is read back).
        self._folder_override = folder
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS 4.9.10's default imports the `importlib_resources` backport, which it only requires on Python < 3.9, so
        # the build dies with ModuleNotFoundError on 3.11. The path only locates a checksums.tsv (none: no downloads).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            # The file's JPEG/PNG bytes, untouched: a scalar object tensor goes in and comes back as bytes. (Image
            # would be decoded to pixels by data_source and checks channel counts; our pipeline preprocesses itself.)
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            # Names are only known once the CSV is read (in _split_generators); TFDS saves them next to the data.
            "label": tfds.features.ClassLabel(),
            **{key: tfds.features.Text()
               for key in ("class_name", "filepath", "common_name", "subspecies", *RANK_COLUMNS)},
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            # Keep the CSV order, so the TFDS source and FolderEvalSource agree index by index.
            disable_shuffling=True,
            homepage="https://imageomics.github.io/bioclip/",
        )

    def _folder(self, dl_manager) -> Path:
        manual = Path(dl_manager.manual_dir)
        subs = (self._folder_override,) if self._folder_override is not None else self.builder_config.folders
        candidates = [manual / sub for sub in subs if sub] + [manual]
        for folder in candidates:
            if find_task_csv(folder) is not None:
                return folder
        raise FileNotFoundError(f"{self.builder_config.name}: no task CSV ({', '.join(CSV_NAMES)}) in "
                                f"{' or '.join(str(c) for c in candidates)}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _split_generators(self, dl_manager):
        folder = self._folder(dl_manager)
        rows, class_names = read_metadata(folder)
        self.info.features["label"].names = class_names
        return {"test": self._generate_examples(folder, rows)}

    def _generate_examples(self, folder: Path, rows: list[EvalRow]):
        for i, row in enumerate(rows):
            # The row number is the key: unique even when a CSV lists a file twice.
            yield i, {"image": (folder / row.filepath).read_bytes(), "label": row.class_name,
                      "class_name": row.class_name, "filepath": row.filepath, "common_name": row.common,
                      "subspecies": row.subspecies, **dict(zip(RANK_COLUMNS, row.ranks))}


def build(task: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
          folder: str | None = None) -> BioclipEvalSet:
    """Builds (once; an existing build is reused) one task from manual_dir into data_dir and returns the builder."""
    builder = BioclipEvalSet(config=task, data_dir=os.fspath(data_dir), folder=folder)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir),
        compute_stats=tfds.download.ComputeStatsMode.SKIP))  # statistics need TensorFlow
    return builder


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class EvalSetSource:
    """A built task read through `tfds.data_source` (random access; picklable, so Grain workers can use it)."""

    def __init__(self, task: str, data_dir: str | os.PathLike):
        # Checked here because TFDS's own error for an unbuilt dataset is a KeyError about empty splits.
        if not BioclipEvalSet(config=task, data_dir=os.fspath(data_dir)).is_prepared():
            raise FileNotFoundError(f"{BioclipEvalSet.name}/{task} is not built in {data_dir}; run "
                                    f"bioclip_jax.data.tfds_eval.build({task!r}, manual_dir, {os.fspath(data_dir)!r})")
        self._source = tfds.data_source(f"{BioclipEvalSet.name}/{task}", split="test", data_dir=os.fspath(data_dir),
                                        download=False)  # never build implicitly: that needs manual_dir
        self.class_names = list(self._source.dataset_info.features["label"].names)
        self._rows: list[EvalRow] | None = None

    def __len__(self) -> int:
        return len(self._source)

    def _row(self, ex) -> EvalRow:
        return EvalRow(filepath=_str(ex["filepath"]), class_name=_str(ex["class_name"]),
                       ranks=tuple(_str(ex[rank]) for rank in RANK_COLUMNS), common=_str(ex["common_name"]),
                       subspecies=_str(ex["subspecies"]))

    @property
    def rows(self) -> list[EvalRow]:
        """Every example's fields without its image, in order (read once, on first use: TFDS reads whole records,
        so this reads the images too)."""
        if self._rows is None:
            self._rows = [self._row(self._source[i]) for i in range(len(self._source))]
        return self._rows

    def __getitem__(self, i: int) -> dict:
        ex = self._source[i]
        return self._row(ex).example(bytes(ex["image"]))
