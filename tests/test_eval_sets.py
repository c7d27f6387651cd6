"""Evaluation tasks as published (eval_sets) and BioCLIP's class naming at evaluation (taxonomy.eval_class_name)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.data.eval_sets import EvalRow, FolderEvalSource, detect_layout, read_task
from bioclip_jax.data.taxonomy import Taxon, eval_class_name

ROOT = Path(__file__).resolve().parents[1]
RARE_HEADER = ["", "kingdom", "phylum", "cls", "order", "family", "genus", "species", "common_name", "filepath",
               "class"]  # rare_species/metadata.csv exactly, pandas' unnamed index column first
ACUMINATA = ["Animalia", "Cnidaria", "Anthozoa", "Scleractinia", "Acroporidae", "Acropora", "acuminata"]
MILLEPORA = ["Animalia", "Cnidaria", "Anthozoa", "Scleractinia", "Acroporidae", "Acropora", "millepora"]
OMAO = ["Animalia", "Chordata", "Aves", "Passeriformes", "Turdidae", "Myadestes", "obscurus"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


def write_rare_species(folder: Path, per_class: int = 2) -> list[list[str]]:
    """A rare_species/metadata.csv folder: two species share the common name 'staghorn coral'."""
    taxa = [(ACUMINATA, "staghorn coral"), (OMAO, "'Oma'o"), (MILLEPORA, "staghorn coral")]
    rows = []
    for ranks, common in taxa:
        for i in range(per_class):
            path = f"2024-03-20/{len(rows)}_{ranks[-1]}_eol-full-size-copy.jpg"
            _image(folder / path, len(rows))
            rows.append([str(len(rows)), *ranks, common, path, f"{ranks[5]} {ranks[6]}"])
    with open(folder / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([RARE_HEADER, *rows])
    return rows


def test_rare_species_metadata_layout(tmp_path):
    write_rare_species(tmp_path)
    rows, layout, csv_path = read_task(tmp_path)
    assert layout == "bioclip" and csv_path.name == "metadata.csv"
    assert rows[0] == EvalRow(filepath="2024-03-20/0_acuminata_eol-full-size-copy.jpg",
                              class_name="Acropora acuminata", ranks=tuple(ACUMINATA), common="staghorn coral")
    source = FolderEvalSource(tmp_path)
    assert source.class_names == ["Acropora acuminata", "Myadestes obscurus", "Acropora millepora"]  # CSV order
    assert [source.rows[i].eval_name("com") for i in (0, 2, 4)] == ["staghorn coral", "'Oma'o", "staghorn coral"]
    assert source[2]["label"] == "Myadestes obscurus" and source[2]["common"] == "'Oma'o"


def test_meta_album_layout_keeps_its_labels(tmp_path):
    _image(tmp_path / "Emiliania_huxleyi/a.png", 0)
    _image(tmp_path / "Cylindrotheca/b.png", 1)
    (tmp_path / "metadata.csv").write_text(",filepath,class\n0,Emiliania_huxleyi/a.png,Emiliania_huxleyi\n"
                                           "1,Cylindrotheca/b.png,Cylindrotheca\n")
    source = FolderEvalSource(tmp_path)
    assert source.class_names == ["Emiliania_huxleyi", "Cylindrotheca"]
    assert source[0]["ranks"] == ("",) * 7 and source[0]["common"] == ""
    # No taxonomy columns: every text type names the class by its label (BioCLIP runs these with asis).
    assert {source.rows[1].eval_name(t) for t in ("asis", "sci", "com", "taxon_com")} == {"Cylindrotheca"}


def write_hf_rare_species(folder: Path) -> None:
    """The Hugging Face rare-species layout: metadata/rarespecies-catalog.csv +
    dataset/<taxa>/<ids>_eol_full-size-copy.jpg"""
    header = ["rarespecies_id", "eol_content_id", "eol_page_id", "kingdom", "phylum", "class", "order", "family",
              "genus", "species", "sciName", "common"]
    rows = [["a1", "29658536", "45510188", *OMAO, "Myadestes obscurus", "'Oma'o"],
            ["a2", "12853737", "449393", *ACUMINATA, "Acropora acuminata", "staghorn coral"],
            ["a3", "22399635", "45510188", *OMAO, "Myadestes obscurus", "'Oma'o"],
            ["a4", "99", "449393", *ACUMINATA, "Acropora acuminata", "staghorn coral"]]  # no image file
    (folder / "metadata").mkdir(parents=True)
    with open(folder / "metadata" / "rarespecies-catalog.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    for i, row in enumerate(rows[:3]):
        taxa = "_".join(row[3:10])
        _image(folder / "dataset" / taxa / f"{row[1]}_{row[2]}_eol_full-size-copy.jpg", i)


def test_hugging_face_rare_species_layout(tmp_path, caplog):
    write_hf_rare_species(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,label\n")  # some other top-level CSV: skipped for the catalog
    rows, layout, csv_path = read_task(tmp_path)
    assert layout == "hf_rare_species" and csv_path == tmp_path / "metadata" / "rarespecies-catalog.csv"
    assert rows[0] == EvalRow(
        filepath="dataset/" + "_".join(OMAO) + "/29658536_45510188_eol_full-size-copy.jpg",
        class_name="Myadestes obscurus", ranks=tuple(OMAO), common="'Oma'o")  # `class` read as the taxonomic class
    source = FolderEvalSource(tmp_path)
    assert len(source) == 3 and "99_449393_eol_full-size-copy.jpg" in caplog.text  # the row without its image
    assert source.class_names == ["Myadestes obscurus", "Acropora acuminata"]
    assert source.rows[1].eval_name("taxon_com") == (
        "Animalia Cnidaria Anthozoa Scleractinia Acroporidae Acropora acuminata with common name staghorn coral")
    assert source[2]["image"] == (tmp_path / source.rows[2].filepath).read_bytes()


def test_csv_matching_no_layout(tmp_path):
    (tmp_path / "metadata.csv").write_text(",path,label\n0,a.jpg,x\n")
    with pytest.raises(ValueError) as err:
        FolderEvalSource(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "metadata.csv") in message
    assert "columns ((unnamed), path, label)" in message
    assert "BioCLIP's metadata.csv (filepath, class" in message and "rarespecies-catalog.csv" in message
    with pytest.raises(ValueError, match="match no evaluation-task layout"):
        detect_layout("catalog.csv", ["kingdom", "class", "sciName"])  # Hugging Face columns without any file key
    with pytest.raises(FileNotFoundError, match="no task CSV"):
        FolderEvalSource(tmp_path / "nothing")


def test_task_folders_as_published(tmp_path):
    from bioclip_jax.evaluate.benchmark import find_tasks

    write_rare_species(tmp_path / "kaggle_bird", per_class=1)
    write_hf_rare_species(tmp_path / "rare-species")
    write_rare_species(tmp_path / "mine", per_class=1)
    found = find_tasks(tmp_path)
    assert set(found) == {"birds_525", "rare_species", "mine"}
    assert found["birds_525"].folder.name == "kaggle_bird" and found["rare_species"].folder.name == "rare-species"
    (tmp_path / "kaggle_bird").rename(tmp_path / "birds_525")
    assert find_tasks(tmp_path)["birds_525"].folder.name == "birds_525"
    with pytest.raises(FileNotFoundError, match="tasks folder .*nowhere does not exist"):
        find_tasks(tmp_path / "nowhere")


@pytest.mark.integration  # a fresh interpreter
def test_folder_evaluation_does_not_import_tfds(tmp_path):
    write_rare_species(tmp_path / "rare_species", per_class=1)
    script = ("import sys; from bioclip_jax.evaluate.benchmark import find_tasks; "
              f"found = find_tasks({str(tmp_path)!r}); assert list(found) == ['rare_species'], found; "
              "assert 'tensorflow_datasets' not in sys.modules, 'TFDS imported'")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_folder_source_pickles(tmp_path):
    import pickle

    write_rare_species(tmp_path)
    source = pickle.loads(pickle.dumps(FolderEvalSource(tmp_path)))  # Grain workers receive it pickled
    assert source[5]["label"] == "Acropora millepora"


# ---------------------------------------------------------------------------------------------- naming at evaluation
MAGPIE = Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"],
                          "black-billed magpie")


@pytest.mark.parametrize("taxon, subspecies, expected", [
    (MAGPIE, "", {
        "sci": "Pica hudsonia", "com": "black-billed magpie",
        "taxon": "Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia",
        "sci_com": "Pica hudsonia with common name black-billed magpie",
        "taxon_com": "Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia with common name "
                     "black-billed magpie"}),
    # No common name: com is empty (no fallback), sci_com / taxon_com are the names alone.
    (Taxon.from_ranks(MAGPIE.ranks), "", {
        "sci": "Pica hudsonia", "com": "", "taxon": "Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia",
        "sci_com": "Pica hudsonia", "taxon_com": "Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia"}),
    # No kingdom: taxon is "Genus species" only, even though other ranks are known.
    (Taxon.from_ranks(["", "Chordata", "Aves", "Passeriformes", "Corvidae", "pica", "Hudsonia"], "magpie"), "", {
        "sci": "Pica hudsonia", "taxon": "Pica hudsonia", "taxon_com": "Pica hudsonia with common name magpie"}),
    # A subspecies column: appended to sci and taxon (lower case).
    (Taxon.from_ranks(["animalia", "chordata", "mammalia", "carnivora", "felidae", "panthera", "tigris"], "tiger"),
     "Altaica", {"sci": "Panthera tigris altaica",
                 "taxon": "Animalia Chordata Mammalia Carnivora Felidae Panthera tigris altaica",
                 "sci_com": "Panthera tigris altaica with common name tiger"}),
    # Missing middle rank with a kingdom: BioCLIP joins all seven ranks, so the gap stays (a double space).
    (Taxon.from_ranks(["Animalia", "", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"]), "", {
        "taxon": "Animalia  Aves Passeriformes Corvidae Pica hudsonia"}),
    # Genus only.
    (Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", ""]), "", {
        "sci": "Pica", "sci_com": "Pica"}),
])
def test_eval_class_names_follow_naming_eval(taxon, subspecies, expected):
    for text_type, name in expected.items():
        assert eval_class_name(taxon, text_type, subspecies) == name, text_type


def test_training_captions_unchanged():
    no_common = Taxon.from_ranks(MAGPIE.ranks)
    assert no_common.name("com") == "Pica hudsonia"  # training keeps its fallback
    assert no_common.text("sci_com") == "a photo of Pica hudsonia with common name Pica hudsonia."
    assert eval_class_name(no_common, "com") == ""
    with pytest.raises(ValueError, match="unknown evaluation text type 'taxonTag'"):
        eval_class_name(MAGPIE, "taxonTag")

