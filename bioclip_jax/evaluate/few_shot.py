"""Few-shot classification with SimpleShot's CL2N nearest centroid (Wang et al. 2019), as BioCLIP's evaluation.

Per fold (seeded by the fold index): draw k support images per class, the rest are queries; centre support and query
features on the support mean, L2-normalise, average each class's supports into a centroid, and classify every query
by its nearest centroid (Euclidean). Report mean and standard deviation of top-1 over the folds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bioclip_jax.errors import InputError


def _cl2n(features: np.ndarray, mean: np.ndarray) -> np.ndarray:
    centred = features - mean
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


def simpleshot_fold(features: np.ndarray, labels: np.ndarray, k: int, fold: int) -> float:
    """Top-1 accuracy of one fold: k supports per class drawn with seed `fold`, every other image a query. Classes
    with k or fewer images contribute supports only."""
    rng = np.random.default_rng(fold)
    classes = np.unique(labels)
    support = np.zeros(len(labels), bool)
    for c in classes:
        members = np.flatnonzero(labels == c)
        support[rng.choice(members, size=min(k, len(members)), replace=False)] = True
    queries = ~support
    if not queries.any():
        raise InputError(f"k={k} leaves no query images: every class has at most {k} images")
    mean = features[support].mean(axis=0)
    support_features, query_features = _cl2n(features[support], mean), _cl2n(features[queries], mean)
    centroids = np.stack([support_features[labels[support] == c].mean(axis=0) for c in classes])
    # |q - c|^2 = |q|^2 - 2 q.c + |c|^2; |q|^2 is the same for every class of a query, so it is left out.
    distances = (centroids ** 2).sum(axis=1)[None, :] - 2 * query_features @ centroids.T
    predicted = classes[distances.argmin(axis=1)]
    return float((predicted == labels[queries]).mean())


def simpleshot(features: np.ndarray, labels: Sequence, k: int, folds: int = 5) -> tuple[float, float]:
    """(mean, std) of top-1 over `folds` folds (fold i seeded with i)."""
    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise InputError(f"{len(features)} features but {len(labels)} labels")
    features = np.asarray(features, np.float64)
    scores = [simpleshot_fold(features, labels, k, fold) for fold in range(folds)]
    return float(np.mean(scores)), float(np.std(scores))
