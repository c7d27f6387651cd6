"""BioCLIP's evaluation sets as a TensorFlow Datasets builder (built and read without TensorFlow), or straight from
the folder.

Each of the paper's 10 tasks is a folder with a `metadata.csv`: columns `filepath` (relative to the folder) and
`class` are required; `kingdom, phylum, cls, order, family, genus, species, common_name` are optional. Users download
the folders themselves (no network here) and put them under one `manual_dir`:

    manual_dir/PLK_Mini/metadata.csv, manual_dir/PLK_Mini/<images>, manual_dir/INS_Mini/..., manual_dir/rare_species/...

    builder = build("plankton", manual_dir, data_dir)   # writes data_dir/bioclip_eval/plankton/1.0.0/*.array_record
    source = EvalSetSource("plankton", data_dir)        # random access, a Grain MapDataset source
    source = FolderEvalSource(manual_dir / "PLK_Mini")  # the same examples, without TFDS

Both sources yield exactly the dict of `bioclip_jax.data.records.decode_record`: {"id": filepath, "image": the file's
bytes, "ranks": 7 str ("" where unknown), "common": str, "label": the class name}, in CSV order.

The sub-folder of a task can be overridden (`build(..., folder="MyPlankton")`), a `manual_dir` that holds
`metadata.csv` itself is used as is, and the `custom` config reads any folder laid out this way.

Why it works without TensorFlow: `file_format="array_record"` (TFRecord writing and `as_dataset` need TF;
ArrayRecord + `tfds.data_source` do not), images are stored as opaque bytes, and statistics are not computed (that
needs TF).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bioclip_jax.data import sources
from bioclip_jax.data.taxonomy import RANK_COLUMNS

log = logging.getLogger(__name__)


# task (config name) -> sub-folder of manual_dir it expects (the Meta-Album "Mini" names as BioCLIP distributes them)
TASK_FOLDERS = {
    "birds_525": "birds_525", "plankton": "PLK_Mini", "insects": "INS_Mini", "insects_2": "INS_2_Mini",
    "plantnet": "PLT_NET_Mini", "fungi": "FNG_Mini", "plantvillage": "PLT_VIL_Mini", "medicinal_leaf": "MED_LF_Mini",
    "plantdoc": "PLT_DOC_Mini", "rare_species": "rare_species",
}


@dataclasses.dataclass(frozen=True)
class Row:
    filepath: str        # as written in the CSV (relative to the folder): the example's id
    class_name: str
    ranks: tuple[str, ...]
    common: str

    def example(self, image: bytes) -> dict:
        """The plain dict our eval pipeline consumes (the same as records.decode_record)."""
        return {"id": self.filepath, "image": image, "ranks": self.ranks, "common": self.common,
                "label": self.class_name}


def read_metadata(folder: str | os.PathLike) -> tuple[list[Row], list[str]]:
    """`folder/metadata.csv` -> (rows whose image file exists, in CSV order; sorted class names).

    Class names come from every row, including rows whose image is missing, so a missing file never renumbers the
    labels of a task. Missing images are skipped with one warning listing them."""
    folder = Path(folder)
    if not (folder / "metadata.csv").is_file():
        raise FileNotFoundError(f"no metadata.csv in {folder}")
    _, cells = sources.read_metadata_csv(str(folder / "metadata.csv"))  # the same parser as make-shards
    # Taxa as make-shards reads them (a binomial in the species column, fallback common names dropped), so a
    # folder evaluates with the same captions as its shards.
    taxa = [sources.row_taxon(c) for c in cells]
    rows = [Row(filepath=c["filepath"], class_name=c["class"], ranks=dataclasses.astuple(t)[:7], common=t.common_name)
            for c, t in zip(cells, taxa)]
    class_names = sorted({r.class_name for r in rows})
    missing = [r.filepath for r in rows if not (folder / r.filepath).is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        log.warning("%s: skipping %d row(s) whose image file is missing: %s", folder / "metadata.csv", len(missing),
                    shown)
        missing_set = set(missing)
        rows = [r for r in rows if r.filepath not in missing_set]
    return rows, class_names


class FolderEvalSource:
    """An evaluation set read straight from its folder (no TFDS build): `len`, `[i] -> dict`, `class_names`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.rows, self.class_names = read_metadata(self.folder)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return row.example((self.folder / row.filepath).read_bytes())


class BioclipEvalConfig(tfds.core.BuilderConfig):
    """One evaluation task; `folder` is the sub-folder of manual_dir it reads ("" = manual_dir itself)."""

    def __init__(self, *, folder: str = "", **kwargs):
        super().__init__(**kwargs)
        self.folder = folder


class BioclipEvalSet(tfds.core.GeneratorBasedBuilder):
    """BioCLIP's 10 evaluation tasks (+ `custom`), one config each, a single `test` split."""

    name = "bioclip_eval"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: images kept as their original encoded bytes."}
    BUILDER_CONFIGS = [BioclipEvalConfig(name=task, folder=folder, description=f"BioCLIP eval task {task}")
                       for task, folder in TASK_FOLDERS.items()]
    BUILDER_CONFIGS.append(BioclipEvalConfig(name="custom", folder="",
                                             description="any folder with a metadata.csv (manual_dir is the folder)"))
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the evaluation folders (each with a metadata.csv) and place them under manual_dir: "
        + ", ".join(f"{t}: {f}/" for t, f in TASK_FOLDERS.items())
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
            **{key: tfds.features.Text() for key in ("class_name", "filepath", "common_name", *RANK_COLUMNS)},
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            # Keep the CSV order, so the TFDS source and FolderEvalSource agree index by index.
            disable_shuffling=True,
            homepage="https://imageomics.github.io/bioclip/",
        )

    def _folder(self, dl_manager) -> Path:
        manual = Path(dl_manager.manual_dir)
        sub = self._folder_override if self._folder_override is not None else self.builder_config.folder
        candidates = [manual / sub, manual] if sub else [manual]
        for folder in candidates:
            if (folder / "metadata.csv").is_file():
                return folder
        raise FileNotFoundError(f"{self.builder_config.name}: no metadata.csv in "
                                f"{' or '.join(str(c) for c in candidates)}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _split_generators(self, dl_manager):
        folder = self._folder(dl_manager)
        rows, class_names = read_metadata(folder)
        self.info.features["label"].names = class_names
        return {"test": self._generate_examples(folder, rows)}

    def _generate_examples(self, folder: Path, rows: list[Row]):
        for i, row in enumerate(rows):
            # The row number is the key: unique even when a CSV lists a file twice.
            yield i, {"image": (folder / row.filepath).read_bytes(), "label": row.class_name,
                      "class_name": row.class_name, "filepath": row.filepath, "common_name": row.common,
                      **dict(zip(RANK_COLUMNS, row.ranks))}


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

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        ex = self._source[i]
        return Row(filepath=_str(ex["filepath"]), class_name=_str(ex["class_name"]),
                   ranks=tuple(_str(ex[rank]) for rank in RANK_COLUMNS),
                   common=_str(ex["common_name"])).example(bytes(ex["image"]))
