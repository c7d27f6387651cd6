"""Prediction like pybioclip: custom labels (80 OpenAI templates per label) and label binning.

Rows are pybioclip's: {"file_name", "classification", "score"}, best first, `k` per image. Images that cannot be read
are reported per file (`failures`) and the rest are still classified.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np

from bioclip_jax.data.transforms import ImageInput, load_image
from bioclip_jax.errors import InputError
from bioclip_jax.inference.model import Model, as_image_list, encode
from bioclip_jax.inference.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import zero_shot_classifier


@dataclasses.dataclass
class Predictions:
    rows: list[dict]
    failures: dict[str, str]  # file name -> why it could not be classified


def image_key(image: ImageInput, index: int) -> str:
    """pybioclip's key: the path for files, the position for in-memory images."""
    return str(image) if isinstance(image, (str, os.PathLike)) else str(index)


def load_images(images: Sequence[ImageInput]) -> tuple[list[str], list, dict[str, str]]:
    """(keys, RGB PIL images, failures). Converted to RGB before any resizing, as pybioclip does."""
    keys, loaded, failures = [], [], {}
    for i, image in enumerate(images):
        key = image_key(image, i)
        try:
            loaded.append(load_image(image).convert("RGB"))
            keys.append(key)
        except (OSError, ValueError, TypeError) as e:
            failures[key] = str(e)
    return keys, loaded, failures


def zero_shot_probabilities(model: Model, image_features: np.ndarray, text_matrix: np.ndarray) -> np.ndarray:
    """softmax(exp(logit_scale) * image_features @ text_matrix) over classes: [N, D] x [D, C] -> [N, C]."""
    logits = model.logit_scale * image_features @ text_matrix
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


class CustomLabelsClassifier:
    """Zero-shot over user labels: each label's embedding is the renormalised mean of its 80 template embeddings."""

    def __init__(self, model: Model, labels: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES):
        self.model = model
        self.labels = [str(label).strip() for label in labels]
        empty = [i for i, label in enumerate(self.labels) if not label]
        if not self.labels or empty:
            raise InputError(f"labels must be non-empty strings; got {len(self.labels)} labels, empty at {empty}")
        self.text_features = zero_shot_classifier(model, self.labels, templates)  # [C, D]

    def probabilities(self, images: Sequence[ImageInput], batch_size: int = 10) -> tuple[list[str], np.ndarray,
                                                                                        dict[str, str]]:
        """(keys, softmax(exp(logit_scale) * img @ txt) [N, C], failures)."""
        keys, loaded, failures = load_images(images)
        if not loaded:
            return keys, np.zeros((0, len(self.labels)), np.float32), failures
        features = encode(self.model, images=loaded, batch_size=batch_size)
        return keys, zero_shot_probabilities(self.model, features, self.text_features.T), failures

    def _rank(self, key: str, scores: dict[str, float], k: int | None) -> list[dict]:
        best = sorted(scores.items(), key=lambda item: -item[1])[:k or len(scores)]
        return [{"file_name": key, "classification": name, "score": float(score)} for name, score in best]

    def predict(self, images: Sequence[ImageInput] | ImageInput, k: int | None = None,
                batch_size: int = 10) -> Predictions:
        keys, probs, failures = self.probabilities(as_image_list(images), batch_size)
        rows = [row for key, p in zip(keys, probs) for row in self._rank(key, self._scores(p), k)]
        return Predictions(rows, failures)

    def _scores(self, probs: np.ndarray) -> dict[str, float]:
        return dict(zip(self.labels, probs))


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Labels mapped to bins; a bin's score is the sum of its labels' probabilities (pybioclip's --bins)."""

    def __init__(self, model: Model, label_to_bin: dict[str, str], **kwargs):
        bad = [label for label, b in label_to_bin.items() if not str(b or "").strip()]
        if bad:
            raise InputError(f"labels without a bin: {bad[:10]}")
        super().__init__(model, list(label_to_bin), **kwargs)
        self.bins = [str(label_to_bin[label]).strip() for label in label_to_bin]

    def _scores(self, probs: np.ndarray) -> dict[str, float]:
        totals: dict[str, float] = collections.defaultdict(float)
        for b, p in zip(self.bins, probs):
            totals[b] += float(p)
        return dict(totals)
