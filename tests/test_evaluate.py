"""Evaluation protocols on constructed embeddings with hand-checked answers, and the template set."""

from __future__ import annotations

import numpy as np
import pytest

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.evaluate.few_shot import (
    BioclipSupportSampler,
    few_shot,
    simpleshot,
    simpleshot_accuracy,
    simpleshot_fold,
)
from bioclip_jax.evaluate.zero_shot import topk_accuracy
from bioclip_jax.inference.templates import BIOCLIP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import class_texts


def test_templates_are_open_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as theirs

    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in theirs] and len(OPENAI_IMAGENET_TEMPLATES) == 80
    # BioCLIP's openai_imagenet_template (src/training/imagenet_zeroshot_data.py) puts its extra template first.
    assert len(BIOCLIP_TEMPLATES) == 81 and BIOCLIP_TEMPLATES[0] == "a photo of {}."
    assert BIOCLIP_TEMPLATES[1:] == OPENAI_IMAGENET_TEMPLATES


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


def bioclip_few_shot_supports(labels, kshot_list=(1, 5), nfold=5):
    """BioCLIP's src/evaluation/few_shot.py sampling loop, re-stated in plain Python on image indices: one list per
    class (order of first appearance, indices in dataset order), `random.seed(fold)` then `random.shuffle` of every
    class's list in place, supports = the first k; the lists carry over between folds and from one k to the next."""
    import random

    select = {}
    for idx, cat in enumerate(labels):
        select.setdefault(cat, {"feature": []})["feature"].append(idx)
    out = {}
    for kshot in kshot_list:
        for n in range(nfold):
            random.seed(n)
            train = []
            for v in select.values():
                random.shuffle(v["feature"])
                train += v["feature"][:kshot]
            out[(kshot, n)] = train
    return out


LABELS = ["b", "b", "a", "c", "b", "a", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "a", "c", "b"]


def test_bioclip_sampling_reproduces_its_loop():
    expected = bioclip_few_shot_supports(LABELS)
    sampler = BioclipSupportSampler(LABELS)
    got = {(k, fold): sampler.supports(k, fold).tolist() for k in (1, 5) for fold in range(5)}
    assert got == expected
    # Pinned (classes in order of first appearance: b, a, c), so a change in the loop or in Python's `random` shows.
    assert got[(1, 0)] == [11, 5, 19] and got[(1, 1)] == [4, 13, 12]
    assert got[(5, 0)] == [20, 1, 11, 14, 0, 7, 16, 5, 10, 13, 15, 9, 6, 3, 12]
    # The k=5 folds continue from the lists the k=1 folds left: run alone, k=5 picks other images.
    alone = BioclipSupportSampler(LABELS)
    assert alone.supports(5, 0).tolist() == [11, 1, 14, 4, 0, 5, 2, 13, 16, 18, 19, 12, 3, 9, 6]
    assert bioclip_few_shot_supports(LABELS, kshot_list=(5,))[(5, 0)] == [11, 1, 14, 4, 0, 5, 2, 13, 16, 18, 19, 12,
                                                                           3, 9, 6]


def test_few_shot_uses_the_bioclip_supports():
    rng = np.random.default_rng(3)
    labels = np.array(LABELS)
    centres = {"a": np.eye(6)[0], "b": np.eye(6)[1], "c": np.eye(6)[2]}
    features = np.stack([2.0 * centres[c] for c in LABELS]) + rng.normal(size=(len(labels), 6))
    expected = bioclip_few_shot_supports(LABELS)
    result = few_shot(features, labels, shots=(1, 5), folds=5, sampling="bioclip")
    for k in (1, 5):
        scores = [simpleshot_accuracy(features, labels, np.array(expected[(k, n)])) for n in range(5)]
        assert result[k]["folds"] == scores
        assert result[k]["mean"] == pytest.approx(np.mean(scores)) and result[k]["std"] == pytest.approx(np.std(scores))
    independent = few_shot(features, labels, shots=(1,), sampling="independent")[1]
    assert independent["folds"] == [simpleshot_fold(features, labels, 1, n) for n in range(5)]
    assert few_shot(features[:6], labels[:6], shots=(5,))[5] == {
        "skipped": "k=5 leaves no query images: every class has at most 5 images"}
    with pytest.raises(ValueError, match="unknown few-shot sampling"):
        few_shot(features, labels, sampling="random")


def test_merge_classes_in_order_of_first_appearance():
    from bioclip_jax.evaluate.benchmark import merge_classes

    names = ["staghorn coral", "'Oma'o", "staghorn coral", "newt", "'Oma'o"]
    labels = ["Acropora acuminata", "Myadestes obscurus", "Acropora millepora", "Tylototriton shanjing",
              "Myadestes obscurus"]
    classes, truth, merged = merge_classes(names, labels)
    assert classes == ["staghorn coral", "'Oma'o", "newt"] and truth.tolist() == [0, 1, 0, 2, 1]
    assert merged == {"staghorn coral": ["Acropora acuminata", "Acropora millepora"]}


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
             ("Corvus corax", ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax"],
              "raven"),
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
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    tasks = results["tasks"]
    assert set(tasks) == {"rare_species", "plankton", "my_set"}
    assert tasks["rare_species"]["classes"] == 3 and tasks["rare_species"]["images"] == 12
    assert tasks["rare_species"]["few_shot_sampling"] == "bioclip" and tasks["rare_species"]["merged_classes"] == 0
    assert 0.0 <= tasks["plankton"]["zero_shot"]["top1"] <= 1.0 and len(tasks["plankton"]["1_shot"]["folds"]) == 5
    table = (tmp_path / "out" / "results.md").read_text()
    assert ("| model | source | Plankton (2 classes, 8 images) | Rare Species (3 classes, 12 images) | my_set (2 "
            "classes, 4 images) | mean | published 10-task mean |") in table
    for section in ("## zero-shot top-1", "## zero-shot top-3", "## zero-shot top-5",
                    "## zero-shot mean per-class top-1", "## 1-shot top-1", "## Tasks"):
        assert section in table
    # Toy tasks under published names are not the published tasks: no published number beside them.
    assert "Plankton: 2 classes here, 86 published; Rare Species: 3 classes here, 400 published." in table
    assert "| BioCLIP | BioCLIP paper, CVPR 2024 |  |  |  |  | 39.4 |" in table
    assert "| CLIP | BioCLIP paper, CVPR 2024 |  |  |  |  | 21.4 |" in table
    assert "dataset card" not in table and "37.8" not in table
    ours = next(line for line in table.splitlines() if line.startswith("| tiny | measured here") and "±" in line)
    assert ours.count("±") == 3  # 1-shot mean ± std for each task
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert csv_text.startswith("metric,model,source,Plankton,Rare Species,my_set,mean,published 10-task mean")
    assert results["table"][0] == csv_text.splitlines()[0].split(",")
    assert {p["source"] for p in results["published"]} >= {"BioCLIP paper, CVPR 2024"}


def test_published_numbers_only_beside_tasks_of_the_published_size():
    from bioclip_jax.evaluate.benchmark import results_markdown, results_table

    def task(classes, images, top1):
        return {"classes": classes, "images": images, "zero_shot_classes": classes, "merged_classes": 0,
                "zero_shot": {"top1": top1, "top3": 0.5, "top5": 0.6, "mean_per_class_top1": 0.25}}

    results = {"rare_species": task(400, 11983, 0.4), "plankton": task(6, 60, 0.1)}
    table = results_table(results, "ours")
    assert ["zero-shot top-1", "BioCLIP", "BioCLIP paper, CVPR 2024", "", "37.8", "", "39.4"] in table
    assert ["zero-shot mean per-class top-1", "ours", "measured here", "25.0", "25.0", "25.0", ""] in table
    card = "Rare Species dataset card (huggingface.co/datasets/imageomics/rare-species)"
    assert ["1-shot top-1", "BioCLIP", card, "", "44.9", "", ""] not in table  # no k-shot measured, no k-shot rows
    markdown = results_markdown(table)
    header = "| model | source | Plankton (6 classes, 60 images) | Rare Species (400 classes, 11,983 images) |"
    assert header in markdown
    assert f"| BioCLIP | {card} |  | 38.09 |  |  |" in markdown
    assert "Plankton: 6 classes here, 86 published." in markdown and "Rare Species: 400" not in markdown


def test_eval_merges_classes_that_share_a_name(tmp_path):
    """A folder laid out like the published rare_species/metadata.csv with two species called 'staghorn coral':
    `--text-type com` merges them into one zero-shot class instead of stopping on duplicate names."""
    import json

    from test_eval_sets import write_rare_species  # tests/ is on sys.path under pytest (rootdir, no package)

    import bioclip_jax
    from bioclip_jax.cli import main

    (tmp_path / "tasks" / "rare_species").mkdir(parents=True)
    write_rare_species(tmp_path / "tasks" / "rare_species", per_class=3)
    bioclip_jax.save_model(bioclip_jax.create_model("tiny"), tmp_path / "model")
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", str(tmp_path / "tasks"), "--text-type", "com",
                 "--shots", "1", "--name", "tiny", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["rare_species"]
    assert (result["classes"], result["zero_shot_classes"], result["merged_classes"]) == (3, 2, 1)
    assert result["merged"] == {"staghorn coral": ["Acropora acuminata", "Acropora millepora"]}
    assert (result["templates"], result["template_count"]) == ("bioclip", 81)  # BioCLIP's 81 by default
    assert "1_shot" in result  # few-shot runs on the 3 species of the class column
    assert "| merged classes | 1 |" in (tmp_path / "out" / "results.md").read_text()


def test_eval_cli_defaults_are_bioclips():
    from bioclip_jax.cli import build_parser
    from bioclip_jax.data.taxonomy import EVAL_TEXT_TYPES

    args = build_parser().parse_args(["eval", "--model", "m", "--out", "o"])
    defaults = (args.templates, args.few_shot_sampling, args.text_type, args.folds)
    assert defaults == ("bioclip", "bioclip", "taxon_com", 5)
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                  if a.dest == "text_type")
    assert tuple(action.choices) == EVAL_TEXT_TYPES
    args = build_parser().parse_args(["eval", "--model", "m", "--out", "o", "--templates", "openai",
                                      "--few-shot-sampling", "independent"])
    assert (args.templates, args.few_shot_sampling) == ("openai", "independent")


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
