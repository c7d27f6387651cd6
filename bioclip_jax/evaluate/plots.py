"""Intrinsic evaluation plot: image embeddings projected to 2-D (PCA) and coloured by a rank, as a PNG.

Drawn with PIL (no plotting library needed): one dot per image, a legend of the most frequent taxa.
"""

from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from bioclip_jax.errors import InputError


def pca_2d(features: np.ndarray) -> np.ndarray:
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_embeddings(features: np.ndarray, labels: Sequence[str], path: str | os.PathLike, title: str = "",
                    size: int = 640, legend: int = 12) -> str:
    """Writes a PNG scatter of the PCA projection of `features`, one colour per label."""
    if len(features) != len(labels) or len(features) < 2:
        raise InputError(f"need at least 2 features with one label each; got {len(features)} and {len(labels)}")
    points = pca_2d(np.asarray(features, np.float64))
    lo, hi = points.min(axis=0), points.max(axis=0)
    margin, plot = 40, size - 80
    xy = margin + (points - lo) / np.maximum(hi - lo, 1e-12) * plot
    names = sorted(set(labels), key=lambda n: (-list(labels).count(n), n))
    colour = {n: tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(len(names), 1), 0.75, 0.85))
              for i, n in enumerate(names)}
    image = Image.new("RGB", (size + 220, size), "white")
    draw = ImageDraw.Draw(image)
    for (x, y), label in zip(xy, labels):
        draw.ellipse([x - 3, size - y - 3, x + 3, size - y + 3], fill=colour[label])
    draw.text((margin, 10), title or "PCA of image embeddings", fill="black")
    for i, name in enumerate(names[:legend]):
        draw.rectangle([size + 10, 40 + 18 * i, size + 20, 50 + 18 * i], fill=colour[name])
        draw.text((size + 26, 38 + 18 * i), name[:28], fill="black")
    if len(names) > legend:
        draw.text((size + 10, 40 + 18 * legend), f"... {len(names) - legend} more", fill="black")
    image.save(path)
    return str(path)
