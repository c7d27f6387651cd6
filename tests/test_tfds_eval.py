"""The TFDS evaluation-set builder: built and read back without TensorFlow, same examples as the raw folder."""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.data import eval_sets, tfds_eval

HEADER = ["filepath", "class", "kingdom", "phylum", "cls", "order", "family", "genus", "species", "common_name"]
MAGPIE = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"]
ROSE = ["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina"]
ROWS = [  # (filepath, class, ranks, common name); PNG and JPEG mixed, one file missing, one partial taxonomy
    ("img/magpie_0.jpg", "Pica hudsonia", MAGPIE, "black-billed magpie"),
    ("img/rose_0.png", "Rosa canina", ROSE, "dog rose"),
    ("img/missing.jpg", "Pica hudsonia", MAGPIE, "black-billed magpie"),
    ("img/corvid.png", "Corvidae", ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "", ""], ""),
    ("img/sub/rose_1.jpg", "Rosa canina", ROSE, "dog rose"),
    ("img/magpie_1.png", "Pica hudsonia", MAGPIE, "black-billed magpie"),
]
PRESENT = [r for r in ROWS if r[0] != "img/missing.jpg"]


def write_folder(folder: Path, rows=ROWS, header=HEADER) -> None:
    rng = np.random.default_rng(0)
    for row in rows:
        if row[0] == "img/missing.jpg":
            continue
        path = folder / row[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)  # format from the suffix
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for filepath, cls, ranks, common in rows:
            w.writerow([filepath, cls, *ranks, common][:len(header)])


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manual")
    (root / "PLK_Mini").mkdir()
    write_folder(root / "PLK_Mini")
    return root


def expected_examples(folder: Path) -> list[dict]:
    return [{"id": fp, "image": (folder / fp).read_bytes(), "ranks": tuple(ranks), "common": common, "label": cls}
            for fp, cls, ranks, common in PRESENT]


# Build and read in a fresh interpreter where `import tensorflow` is made to fail, so the test proves the path is
# TF-free even on a machine that has TensorFlow installed.
NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.machinery, pickle, sys

    class HideTensorFlow:
        # Wraps the standard path finder so `tensorflow` is simply not found (find_spec -> None, import ->
        # ModuleNotFoundError), as if uninstalled. sys.modules["tensorflow"] = None would not do: etils then
        # believes TF is loaded, and a finder that raises breaks TFDS's find_spec probes.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [HideTensorFlow() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    from bioclip_jax.data import eval_sets, tfds_eval
    manual_dir, data_dir, out = sys.argv[1:]
    tfds_eval.build("plankton", manual_dir, data_dir)
    source = tfds_eval.EvalSetSource("plankton", data_dir)
    examples = [source[i] for i in range(len(source))]
    assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
    try:
        import tensorflow
        raise AssertionError("tensorflow should not be importable here")
    except ImportError:
        pass
    with open(out, "wb") as f:
        pickle.dump((source.class_names, examples), f)
""")


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    out = data_dir / "examples.pkl"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", NO_TF_SCRIPT, str(manual_dir), str(data_dir), str(out)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/missing.jpg" in proc.stderr  # the skipped row is reported, the build goes on
    return data_dir


@pytest.mark.integration  # builds in a subprocess
def test_tfds_build_without_tensorflow(manual_dir, built):
    with open(built / "examples.pkl", "rb") as f:
        class_names, examples = pickle.load(f)
    assert class_names == ["Pica hudsonia", "Rosa canina", "Corvidae"]  # order of first appearance, as BioCLIP
    assert examples == expected_examples(manual_dir / "PLK_Mini")  # every file once, in CSV order, bytes identical
    files = list((built / "bioclip_eval" / "plankton" / "1.1.0").glob("*.array_record*"))
    assert files, "expected ArrayRecord shards"


@pytest.mark.integration  # builds in a subprocess
def test_eval_set_source_random_access(manual_dir, built):
    source = tfds_eval.EvalSetSource("plankton", built)
    expected = expected_examples(manual_dir / "PLK_Mini")
    assert len(source) == len(expected)
    for i in reversed(range(len(source))):  # random access, not a stream
        assert source[i] == expected[i]
    assert pickle.loads(pickle.dumps(source))[2] == expected[2]  # Grain workers receive it pickled

    import grain
    assert grain.MapDataset.source(source)[1]["label"] == "Rosa canina"
    with pytest.raises(FileNotFoundError, match="not built"):
        tfds_eval.EvalSetSource("fungi", built)


@pytest.mark.integration  # builds in a subprocess
def test_folder_source_matches_tfds(manual_dir, built):
    folder = eval_sets.FolderEvalSource(manual_dir / "PLK_Mini")
    source = tfds_eval.EvalSetSource("plankton", built)
    assert folder.class_names == source.class_names
    assert [folder[i] for i in range(len(folder))] == [source[i] for i in range(len(source))]
    assert folder.rows == source.rows  # what BioCLIP's class naming reads
    assert tfds_eval.FolderEvalSource is eval_sets.FolderEvalSource  # still importable from here


def test_custom_config_and_minimal_csv(tmp_path):
    # Only the required columns: every rank and common name comes back "".
    folder = tmp_path / "MyTask"
    folder.mkdir()
    write_folder(folder, rows=PRESENT[:2], header=["filepath", "class"])
    builder = tfds_eval.build("custom", folder, tmp_path / "data")
    assert builder.info.features["label"].names == ["Pica hudsonia", "Rosa canina"]
    assert tfds_eval.EvalSetSource("custom", tmp_path / "data").rows[0].subspecies == ""
    source = tfds_eval.EvalSetSource("custom", tmp_path / "data")
    assert source[1] == {"id": "img/rose_0.png", "image": (folder / "img/rose_0.png").read_bytes(),
                         "ranks": ("",) * 7, "common": "", "label": "Rosa canina"}


def test_folder_override(tmp_path):
    (tmp_path / "manual" / "plankton_download").mkdir(parents=True)
    write_folder(tmp_path / "manual" / "plankton_download", rows=PRESENT[:3])
    with pytest.raises(FileNotFoundError, match="PLK_Mini"):  # the expected name is in the error
        tfds_eval.build("plankton", tmp_path / "manual", tmp_path / "a")
    builder = tfds_eval.build("plankton", tmp_path / "manual", tmp_path / "b", folder="plankton_download")
    assert builder.info.splits["test"].num_examples == 3


def test_missing_class_column(tmp_path):
    write_folder(tmp_path, rows=PRESENT[:1], header=["filepath", "kingdom"])
    csv_path = str(tmp_path / "metadata.csv")
    with pytest.raises(ValueError, match=r"columns \(filepath, kingdom\) match no evaluation-task layout") as err:
        eval_sets.FolderEvalSource(tmp_path)
    assert csv_path in str(err.value)
    with pytest.raises(ValueError, match="match no evaluation-task layout"):
        tfds_eval.build("custom", tmp_path, tmp_path / "data")


def test_every_task_has_a_config():
    configs = tfds_eval.BioclipEvalSet.builder_configs
    assert set(tfds_eval.TASK_FOLDERS) | {"custom"} == set(configs)
    assert configs["insects_2"].folder == "INS_2_Mini"
    assert configs["birds_525"].folders == ("kaggle_bird", "birds_525")  # as published, then our old name


def test_published_folder_names_and_subspecies(tmp_path):
    """Birds 525 builds from kaggle_bird/; a subspecies column survives the build."""
    header = ["", *HEADER, "subspecies"]
    rows = [(fp, cls, ranks, common) for fp, cls, ranks, common in PRESENT[:2]]
    write_folder(tmp_path / "manual" / "kaggle_bird", rows=rows, header=HEADER)
    with open(tmp_path / "manual" / "kaggle_bird" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (fp, cls, ranks, common) in enumerate(rows):
            w.writerow([i, fp, cls, *ranks, common, "Ssp" if i == 0 else ""])
    tfds_eval.build("birds_525", tmp_path / "manual", tmp_path / "data")
    source = tfds_eval.EvalSetSource("birds_525", tmp_path / "data")
    assert source.rows == eval_sets.FolderEvalSource(tmp_path / "manual" / "kaggle_bird").rows
    assert source.rows[0].subspecies == "Ssp" and source.rows[0].eval_name("sci") == "Pica hudsonia ssp"


def test_folder_taxa_read_as_make_shards_reads_them(tmp_path):
    """A binomial in the species column (no genus column) gives the same ranks in evaluation as in the shards; the
    common name stays as written (BioCLIP's evaluation naming has no fallback to drop)."""
    from bioclip_jax.data.taxonomy import Taxon, row_taxon

    header = ["filepath", "class", "kingdom", "species", "common_name"]
    write_folder(tmp_path, [("img/magpie_0.jpg", "Pica hudsonia", ["Animalia", "Pica hudsonia"], "Pica hudsonia")],
                 header)
    row = eval_sets.FolderEvalSource(tmp_path).rows[0]
    sharded = row_taxon({"kingdom": "Animalia", "species": "Pica hudsonia", "common_name": "Pica hudsonia"})
    assert Taxon.from_ranks(row.ranks) == Taxon.from_ranks(sharded.ranks)
    assert Taxon.from_ranks(row.ranks).text("taxon") == "a photo of Animalia Pica hudsonia."
    assert row.common == "Pica hudsonia" and sharded.common_name == ""
    # BioCLIP joins all seven ranks: four empty ones between kingdom and genus leave five spaces.
    assert row.eval_name("taxon_com") == "Animalia" + " " * 5 + "Pica hudsonia with common name Pica hudsonia"
