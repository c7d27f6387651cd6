"""Few-shot classification with SimpleShot's CL2N nearest centroid (Wang et al. 2019), as BioCLIP's evaluation.

Per fold: k support images per class, the rest are queries; centre support and query features on the support mean,
L2-normalise, average each class's supports into a centroid, and classify every query by its nearest centroid
(Euclidean). Report mean and standard deviation (np.std) of top-1 over the folds.

Two ways to pick the supports:

- "bioclip" (the default), exactly as BioCLIP's src/evaluation/few_shot.py: the images of each class are kept in one
  list per class (classes in order of first appearance, images in source order); each fold seeds Python's `random`
  with the fold number and shuffles every class's list IN PLACE with `random.shuffle`, class after class; the
  supports are the first k of each list. The lists are never reset, so each fold starts from the previous fold's
  order, and the k=5 folds start from where the k=1 folds left them: the sampled images depend on the sequence of k
  run in one evaluation (BioCLIP's `--kshot_list`, default [1, 5]). `BioclipSupportSampler` keeps that state.
- "independent": every (k, fold) draws its supports afresh with NumPy's generator seeded by the fold.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from bioclip_jax.errors import InputError

SAMPLINGS = ("bioclip", "independent")


def _cl2n(features: np.ndarray, mean: np.ndarray) -> np.ndarray:
    centred = features - mean
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


class BioclipSupportSampler:
    """BioCLIP's support draw, with the per-class lists it shuffles in place carried from call to call."""

    def __init__(self, labels: Sequence):
        self._lists: dict = {}
        for i, label in enumerate(labels):  # insertion order = order of first appearance
            self._lists.setdefault(label, []).append(i)

    def supports(self, k: int, fold: int) -> np.ndarray:
        """Indices of the k supports of every class for this fold (class after class), advancing the state."""
        rng = random.Random(fold)  # the same stream as `random.seed(fold)` followed by `random.shuffle` calls
        chosen = []
        for members in self._lists.values():
            rng.shuffle(members)
            chosen += members[:k]
        return np.array(chosen, dtype=np.int64)


def independent_supports(labels: np.ndarray, k: int, fold: int) -> np.ndarray:
    """k supports per class drawn without replacement by NumPy's generator seeded with `fold`."""
    rng = np.random.default_rng(fold)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen += list(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.array(chosen, dtype=np.int64)


def simpleshot_accuracy(features: np.ndarray, labels: np.ndarray, support_indices: np.ndarray) -> float:
    """Top-1 accuracy of the nearest CL2N centroid over every image that is not a support. A class with no more
    images than k contributes supports only."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    support = np.zeros(len(labels), bool)
    support[support_indices] = True
    queries = ~support
    if not queries.any():
        raise InputError("no query images left: every image of every class is a support")
    classes = np.unique(labels[support])
    mean = features[support].mean(axis=0)
    support_features, query_features = _cl2n(features[support], mean), _cl2n(features[queries], mean)
    centroids = np.stack([support_features[labels[support] == c].mean(axis=0) for c in classes])
    # |q - c|^2 = |q|^2 - 2 q.c + |c|^2; |q|^2 is the same for every class of a query, so it is left out.
    distances = (centroids ** 2).sum(axis=1)[None, :] - 2 * query_features @ centroids.T
    predicted = classes[distances.argmin(axis=1)]
    return float((predicted == labels[queries]).mean())


def few_shot(features: np.ndarray, labels: Sequence, shots: Sequence[int] = (1, 5), folds: int = 5,
             sampling: str = "bioclip") -> dict[int, dict]:
    """{k: {"mean", "std", "folds": [top-1 per fold]}} for each k of `shots`, run in that order (with "bioclip"
    sampling the order matters, see the module docstring). A k that leaves no query image gets {"skipped": why}."""
    if sampling not in SAMPLINGS:
        raise InputError(f"unknown few-shot sampling {sampling!r}; expected one of {SAMPLINGS}")
    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise InputError(f"{len(features)} features but {len(labels)} labels")
    sampler = BioclipSupportSampler(labels.tolist()) if sampling == "bioclip" else None
    largest_class = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    results = {}
    for k in shots:
        scores = []
        for fold in range(folds):
            chosen = sampler.supports(k, fold) if sampler else independent_supports(labels, k, fold)
            if largest_class > k:  # the sampler still advances through every fold, as BioCLIP's loop does
                scores.append(simpleshot_accuracy(features, labels, chosen))
        if largest_class > k:
            results[k] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "folds": scores}
        else:
            results[k] = {"skipped": f"k={k} leaves no query images: every class has at most {k} images"}
    return results


def simpleshot_fold(features: np.ndarray, labels: np.ndarray, k: int, fold: int) -> float:
    """Top-1 accuracy of one fold with independently drawn supports (seed `fold`)."""
    labels = np.asarray(labels)
    chosen = independent_supports(labels, k, fold)
    if len(chosen) == len(labels):
        raise InputError(f"k={k} leaves no query images: every class has at most {k} images")
    return simpleshot_accuracy(features, labels, chosen)


def simpleshot(features: np.ndarray, labels: Sequence, k: int, folds: int = 5,
               sampling: str = "independent") -> tuple[float, float]:
    """(mean, std) of top-1 over `folds` folds for one k on its own."""
    result = few_shot(features, labels, shots=(k,), folds=folds, sampling=sampling)[k]
    if "skipped" in result:
        raise InputError(result["skipped"])
    return result["mean"], result["std"]
