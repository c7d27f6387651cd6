"""Evaluation protocols on constructed embeddings with hand-checked answers, and the template set."""

from __future__ import annotations

import numpy as np
import pytest

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.evaluate.few_shot import simpleshot, simpleshot_fold
from bioclip_jax.evaluate.templates import BIOCLIP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.evaluate.zero_shot import class_texts, topk_accuracy


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
    from bioclip_jax.evaluate.zero_shot import zero_shot_classifier

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
