"""pybioclip-style prediction: parity with pybioclip's CustomLabelsClassifier on the same exported weights and images,
label binning, per-file failures, and the embed command's JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import main
from bioclip_jax.convert.files import Checkpoint
from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier
from bioclip_jax.inference.model import from_checkpoint
from conftest import TINY_OPEN_CLIP_CFG

LABELS = ["Pica hudsonia", "Corvus corax", "Danaus plexippus", "Amanita muscaria"]


@pytest.fixture(scope="module")
def exported(tiny_open_clip, tmp_path_factory):
    """(open_clip folder exported by bioclip_jax, image paths)."""
    folder = tmp_path_factory.mktemp("predict")
    model = from_checkpoint(Checkpoint("tiny", state_dict=tiny_open_clip[1]), model="tiny")
    export = bioclip_jax.export_open_clip(model, folder / "export")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(80, 120), (64, 64), (200, 90)]):
        images.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    return export, images


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_matches_pybioclip(exported, tmp_path, monkeypatch):
    import open_clip
    import torch
    from bioclip.predict import CustomLabelsClassifier as PyBioclipCustomLabels

    folder, images = exported
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(config)  # registers "tiny", so pybioclip can name it as model_str
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # same math, no compile time in tests
    reference = PyBioclipCustomLabels(cls_ary=LABELS, model_str="tiny",
                                      pretrained_str=str(folder / "open_clip_model.safetensors"))
    expected = reference.predict(images, k=3)

    assert main(["predict", *images, "--model", str(folder), "--cls", ",".join(LABELS), "--k", "3",
                 "--preprocess", "open_clip", "--output", str(tmp_path / "out.csv")]) == 0
    ours = _read_csv(tmp_path / "out.csv")
    assert [(r["file_name"], r["classification"]) for r in ours] == \
        [(r["file_name"], r["classification"]) for r in expected]
    np.testing.assert_allclose([float(r["score"]) for r in ours], [r["score"] for r in expected], atol=1e-3)


def test_binning_sums_label_probabilities(exported):
    folder, images = exported
    model = bioclip_jax.load(folder)
    plain = CustomLabelsClassifier(LABELS, model_str=model).predict(images[:1])
    bins = {"Pica hudsonia": "birds", "Corvus corax": "birds", "Danaus plexippus": "insects",
            "Amanita muscaria": "fungi"}
    binned = {r["classification"]: r["score"] for r in CustomLabelsBinningClassifier(bins, model_str=model).predict(
        images[:1])}
    by_label = {r["classification"]: r["score"] for r in plain}
    assert binned["birds"] == pytest.approx(by_label["Pica hudsonia"] + by_label["Corvus corax"], abs=1e-6)
    assert sum(binned.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="labels without a bin"):
        CustomLabelsBinningClassifier({"a": ""}, model_str=model)


def test_bad_files_are_reported_and_the_rest_classified(exported, tmp_path, capsys):
    folder, images = exported
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code = main(["predict", images[0], str(broken), str(tmp_path / "missing.jpg"), "--model", str(folder),
                 "--cls", "a bird,a fungus", "--format", "table"])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err and "missing.jpg" in captured.err
    assert images[0] in captured.out and "classification" in captured.out
    assert main(["predict", images[0], "--model", str(folder), "--cls", " , "]) == 2
    assert "labels must be non-empty" in capsys.readouterr().err


def test_embed_json(exported, tmp_path):
    folder, images = exported
    assert main(["embed", *images, "--model", str(folder), "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["embeddings"]) == set(images)
    model = bioclip_jax.load(folder)
    expected = bioclip_jax.encode(model, images=[Image.open(p).convert("RGB") for p in images], normalize=False,
                                  preprocess="pybioclip")  # pybioclip squashes for BioCLIP models: so do we
    np.testing.assert_allclose([result["embeddings"][p] for p in images], expected, atol=1e-6)
    assert main(["embed", *images, "--model", str(folder), "--preprocess", "open_clip", "--output",
                 str(tmp_path / "crop.json")]) == 0
    cropped = json.loads((tmp_path / "crop.json").read_text())["embeddings"]
    np.testing.assert_allclose([cropped[p] for p in images], bioclip_jax.encode(model, images=images,
                                                                                normalize=False), atol=1e-6)


def _taxa_csv(path):
    rows = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "black-billed magpie"),
            ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "common raven"),
            ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "brachyrhynchos", ""),
            ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "monarch"),
            ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria", "")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name"])
        writer.writerows(rows)
    return path


def test_tree_of_life_prediction_sums_species_by_rank(exported, tmp_path):
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier, load_txt_emb

    folder, images = exported
    assert main(["make-txt-emb", str(_taxa_csv(tmp_path / "taxa.csv")), "--model", str(folder),
                 "--out", str(tmp_path / "emb")]) == 0
    matrix, taxa = load_txt_emb(tmp_path / "emb")
    assert matrix.shape == (64, 5) and np.allclose(np.linalg.norm(matrix, axis=0), 1, atol=1e-5)
    assert taxa[1].common_name == "common raven" and taxa[0].ranks[6] == "hudsonia"

    classifier = TreeOfLifeClassifier(bioclip_jax.load(folder), txt_emb=tmp_path / "emb")
    species = classifier.predict(images[:1], rank="species", k=5)
    assert list(species[0]) == ["file_name", "kingdom", "phylum", "class", "order", "family", "genus",
                                "species_epithet", "species", "common_name", "score"]
    assert sum(r["score"] for r in species) == pytest.approx(1.0, abs=1e-5)
    by_species = {r["species"]: r["score"] for r in species}
    genus = {r["genus"]: r["score"] for r in classifier.predict(images[:1], rank="genus", k=5)}
    assert genus["Corvus"] == pytest.approx(by_species["Corvus corax"] + by_species["Corvus brachyrhynchos"], abs=1e-6)
    kingdoms = classifier.predict(images[:1], rank=bioclip_jax.Rank.KINGDOM, k=1)
    assert len(kingdoms) == 1 and list(kingdoms[0]) == ["file_name", "kingdom", "score"]

    (tmp_path / "subset.csv").write_text("family\nCorvidae\n")
    assert main(["predict", images[0], "--model", str(folder), "--rank", "species", "--txt-emb",
                 str(tmp_path / "emb"), "--subset", str(tmp_path / "subset.csv"), "--output",
                 str(tmp_path / "sub.csv")]) == 0
    subset_rows = _read_csv(tmp_path / "sub.csv")
    assert {r["family"] for r in subset_rows} == {"Corvidae"} and len(subset_rows) == 3


def test_text_embeddings_of_another_model_are_refused(exported, tmp_path):
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier, save_txt_emb
    from bioclip_jax.data.taxonomy import Taxon

    folder, _ = exported
    save_txt_emb(tmp_path / "emb", np.ones((1, 512), np.float32), [Taxon.from_ranks(["A", "", "", "", "", "B", "c"])])
    with pytest.raises(ValueError, match="dimension 512, but the model embeds to 64"):
        TreeOfLifeClassifier(bioclip_jax.load(folder), txt_emb=tmp_path / "emb")
    assert main(["predict", "x.jpg", "--model", str(folder), "--rank", "genus"]) == 2  # needs --txt-emb
