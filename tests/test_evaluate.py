"""Evaluation protocols on constructed embeddings with hand-checked answers, and the template set."""

from __future__ import annotations

import numpy as np
import pytest

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.evaluate.few_shot import simpleshot, simpleshot_fold
from bioclip_jax.evaluate.zero_shot import topk_accuracy
from bioclip_jax.inference.templates import BIOCLIP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import class_texts


def test_templates_are_open_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as theirs

    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in theirs] and len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(BIOCLIP_TEMPLATES) == 81 and "a photo of {}." in BIOCLIP_TEMPLATES


def test_topk_and_mean_per_class_accuracy():
    logits = np.array([[0.9, 0.1, 0.0],   # label 0: top-1 right
                       [0.5, 0.4, 0.1],   # label 1: second
                       [0.5, 0.3, 0.2],   # label 2: third
                       [0.1, 0.8, 0.1]])  # label 1: right
    labels = np.array([0, 1, 2, 1])
    result = topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert result == {"top1": 0.5, "top2": 0.75, "top3": 1.0, "mean_per_class_top1": (1 + 0.5 + 0) / 3}


def test_class_texts_by_text_type():
    magpie = Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"],
                              "black-billed magpie")
    assert class_texts(["magpie"]) == ["magpie"]
    assert class_texts([magpie], "sci") == ["Pica hudsonia"]
    assert class_texts([magpie], "taxon_com") == [
        "Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia with common name black-billed magpie"]
    with pytest.raises(ValueError, match="needs taxa"):
        class_texts(["magpie"], "sci")


def test_simpleshot_on_constructed_features():
    # Two classes on either side of an offset: after centring on the support mean they are opposite, so the
    # nearest centroid is always right, whichever supports a fold draws.
    rng = np.random.default_rng(0)
    offset = np.array([10.0, 10.0, 0.0])
    a = offset + np.array([1.0, 0, 0]) + 0.05 * rng.normal(size=(6, 3))
    b = offset + np.array([-1.0, 0, 0]) + 0.05 * rng.normal(size=(6, 3))
    features, labels = np.concatenate([a, b]), np.array([0] * 6 + [1] * 6)
    assert simpleshot(features, labels, k=1) == (1.0, 0.0)
    assert simpleshot(features, labels, k=5) == (1.0, 0.0)
    # Without centring (plain cosine) these would all look alike: CL2N is what separates them.
    cosine = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert (cosine @ cosine.T).min() > 0.98


def test_simpleshot_folds_are_seeded_and_differ():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 8))
    labels = np.repeat(np.arange(4), 10)
    assert simpleshot_fold(features, labels, 1, 3) == simpleshot_fold(features, labels, 1, 3)
    mean, std = simpleshot(features, labels, k=1)
    assert std > 0 and 0 <= mean <= 1  # random features: folds disagree
    with pytest.raises(ValueError, match="leaves no query images"):
        simpleshot(features[:8], np.repeat(np.arange(4), 2), k=5)


def test_zero_shot_classifier_averages_normalised_template_embeddings():
    import bioclip_jax
    from bioclip_jax.inference.zero_shot import zero_shot_classifier

    model = bioclip_jax.create_model("tiny")
    templates = OPENAI_IMAGENET_TEMPLATES[:3]
    weights = zero_shot_classifier(model, ["Pica hudsonia", "Corvus corax"], templates)
    assert weights.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
    per_template = bioclip_jax.encode(model, texts=[t.format("Pica hudsonia") for t in templates])
    expected = per_template.mean(axis=0)
    np.testing.assert_allclose(weights[0], expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(ValueError, match="duplicate class names"):
        zero_shot_classifier(model, ["a", "a"], templates)


def _task_folder(folder, classes, per_class=4, seed=0):
    import csv

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "class", "kingdom", "phylum", "cls", "order", "family", "genus", "species",
                         "common_name"])
        for c, (name, ranks, common) in enumerate(classes):
            for i in range(per_class):
                path = f"{c}_{i}.jpg"
                from PIL import Image
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / path)
                writer.writerow([path, name, *ranks, common])


def test_benchmark_runner_writes_the_paper_table(tmp_path):
    import json

    from bioclip_jax.cli import main

    birds = [("Pica hudsonia", ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"],
              "black-billed magpie"),
             ("Corvus corax", ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax"], "raven"),
             ("Danaus plexippus", ["Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus",
                                   "plexippus"], "monarch")]
    _task_folder(tmp_path / "tasks" / "rare_species", birds)
    _task_folder(tmp_path / "tasks" / "PLK_Mini", [(n, [""] * 7, "") for n in ("diatom", "copepod")], seed=1)
    _task_folder(tmp_path / "tasks" / "my_set", birds[:2], per_class=2, seed=2)  # any other folder: a custom task
    bioclip_jax_model = tmp_path / "model"
    import bioclip_jax

    bioclip_jax.save_model(bioclip_jax.create_model("tiny"), bioclip_jax_model)
    assert main(["eval", "--model", str(bioclip_jax_model), "--tasks", str(tmp_path / "tasks"), "--shots", "1",
                 "--templates", "single", "--name", "tiny", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert set(results) == {"rare_species", "plankton", "my_set"}
    assert results["rare_species"]["classes"] == 3 and results["rare_species"]["images"] == 12
    assert 0.0 <= results["plankton"]["zero_shot"]["top1"] <= 1.0 and "1_shot" in results["plankton"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| model | Plankton | Rare Species | my_set | mean |" in table
    assert "| BioCLIP (paper) | 6.1 | 37.8 |  | 39.4 (10 tasks) |" in table
    assert (tmp_path / "out" / "results.csv").read_text().startswith("model,Plankton,Rare Species,my_set,mean")


def test_hierarchy_consistency_and_plot(tmp_path):
    import bioclip_jax
    from bioclip_jax.evaluate.plots import plot_embeddings
    from bioclip_jax.evaluate.zero_shot import hierarchy_consistency

    model = bioclip_jax.create_model("tiny")
    taxa = [Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", g, s])
            for g, s in (("Pica", "pica"), ("Corvus", "corax"), ("Corvus", "monedula"))]
    features = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    consistency = hierarchy_consistency(model, features, taxa)
    assert consistency["kingdom"] == 1.0 and consistency["family"] == 1.0  # one lineage down to family
    assert 0.0 <= consistency["genus"] <= 1.0
    path = plot_embeddings(features, ["a"] * 5 + ["b"] * 5, tmp_path / "pca.png", title="test")
    from PIL import Image

    image = Image.open(path)
    assert image.size == (860, 640) and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 3
