"""pybioclip's classifiers with its names and signatures: custom labels (80 OpenAI templates per label) and label
binning. `TreeOfLifeClassifier` is in tree_of_life.py.

    classifier = CustomLabelsClassifier(["Pica hudsonia", "Corvus corax"], model_str="path/to/open_clip_folder")
    rows = classifier.predict(["a.jpg", "b.jpg"], k=1)   # [{"file_name", "classification", "score"}, ...]
    classifier.failures                                  # {"b.jpg": "why it could not be read"}

`model_str` is what `bioclip_jax.load` reads (a folder, a weights file, hf-hub:ORG/NAME, bioclip, bioclip-2) or an
already loaded `Model`; `pretrained_str`, as in pybioclip, is a weights file and `model_str` then names its
architecture. Images are squashed to the model's input size as pybioclip does for its BioCLIP models
(`preprocess="pybioclip"`); `preprocess="open_clip"` uses the model's own center-crop transform instead.
Images stream through worker threads one batch at a time; unreadable images are left out of the rows and listed in
`failures` (file name -> why), which the next `predict` replaces.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bioclip_jax.convert.hub import HUB_PREFIX
from bioclip_jax.data.transforms import ImageInput, Preprocess
from bioclip_jax.errors import InputError
from bioclip_jax.inference.model import (Model, as_image_list, iter_image_features, load, normalize_features,
                                         on_device, pick_preprocess)
from bioclip_jax.inference.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import zero_shot_classifier

BIOCLIP_MODEL_STR = "hf-hub:imageomics/bioclip-2"  # pybioclip's default model
DEFAULT_BATCH_SIZE = 10


def image_key(image: ImageInput, index: int) -> str:
    """pybioclip's key: the path for files, the position for in-memory images."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(index)


def load_model(model_str: str | os.PathLike | Model | None = BIOCLIP_MODEL_STR, pretrained_str: str | None = None,
               device: Any = None) -> Model:
    """pybioclip's (model_str, pretrained_str, device) as a `Model`; see the module docstring."""
    if isinstance(model_str, Model):
        if pretrained_str:
            raise InputError("pretrained_str is for weights named by file; model_str is a loaded Model already")
        model = model_str
    elif pretrained_str:  # model_str is the architecture; a release's hub name stands for its own (bioclip-2: L/14)
        arch = os.fspath(model_str) if model_str else None
        if arch and arch.startswith(HUB_PREFIX + "imageomics/"):
            arch = arch.rsplit("/", 1)[1]
        model = load(pretrained_str, model=arch)
    else:
        model = load(model_str or BIOCLIP_MODEL_STR)
    return on_device(model, device)


def zero_shot_probabilities(model: Model, image_features: np.ndarray, text_matrix: np.ndarray) -> np.ndarray:
    """softmax(exp(logit_scale) * image_features @ text_matrix) over classes: [N, D] x [D, C] -> [N, C]. Non-finite
    scores (broken weights, e.g. a NaN logit_scale) are an InputError naming the model."""
    logits = model.logit_scale * image_features @ text_matrix
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if not np.isfinite(probs).all():
        raise InputError(f"model {model.source or '(in memory)'}: non-finite scores (logit_scale "
                         f"{model.logit_scale}, image features finite: {bool(np.isfinite(image_features).all())}); "
                         "the weights are broken")
    return probs


class BaseClassifier:
    """The loaded model, its preprocessing and the image loop shared by pybioclip's classifiers."""

    def __init__(self, model_str: str | os.PathLike | Model | None = BIOCLIP_MODEL_STR,
                 pretrained_str: str | None = None, device: Any = None, *,
                 preprocess: str | Preprocess | None = "pybioclip", progress: bool = True):
        self.model = load_model(model_str, pretrained_str, device)
        self.model_str = self.model.source if isinstance(model_str, Model) else os.fspath(model_str or
                                                                                           BIOCLIP_MODEL_STR)
        self.pretrained_str = pretrained_str
        self.preprocess = pick_preprocess(self.model, preprocess)
        self.progress = progress
        self.failures: dict[str, str] = {}

    def iter_image_features(self, images, batch_size: int = DEFAULT_BATCH_SIZE, normalize: bool = True,
                            callback: Callable[[int, int], None] | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, features [B', D]) per batch, streaming; unreadable images go into `self.failures`."""
        images = as_image_list(images)
        if batch_size is None or batch_size < 1:
            batch_size = max(len(images), 1)  # pybioclip: no batch size means one batch
        self.failures = {}
        failed: dict[int, str] = {}
        keys = [image_key(image, i) for i, image in enumerate(images)]
        try:
            for positions, features in iter_image_features(self.model, images, batch_size, self.preprocess,
                                                           failures=failed, progress=self.progress,
                                                           callback=callback):
                yield [keys[j] for j in positions], normalize_features(features) if normalize else features
        finally:
            self.failures = {keys[j]: why for j, why in sorted(failed.items())}

    def create_image_features(self, images, normalize: bool = True,
                              batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """[N, D] features of the images that could be read (see `failures` for the others)."""
        feats = [f for _, f in self.iter_image_features(images, batch_size, normalize)]
        return np.concatenate(feats) if feats else np.zeros((0, self.model.config.embed_dim), np.float32)

    def iter_probabilities(self, images, text_matrix: np.ndarray, batch_size: int,
                           callback: Callable[[int, int], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(key, softmax probabilities [C]) per readable image, one batch in memory at a time."""
        for keys, features in self.iter_image_features(images, batch_size, callback=callback):
            yield from zip(keys, zero_shot_probabilities(self.model, features, text_matrix))


class CustomLabelsClassifier(BaseClassifier):
    """Zero-shot over user labels: each label's embedding is the renormalised mean of its 80 template embeddings."""

    def __init__(self, cls_ary: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, **kwargs):
        super().__init__(**kwargs)
        self.classes = [str(label).strip() for label in cls_ary]
        empty = [i for i, label in enumerate(self.classes) if not label]
        if not self.classes or empty:
            raise InputError(f"labels must be non-empty strings; got {len(self.classes)} labels, empty at {empty}")
        self.txt_embeddings = zero_shot_classifier(self.model, self.classes, templates).T  # [D, C] as pybioclip

    def predict(self, images: Sequence[ImageInput] | ImageInput, k: int | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE,
                callback: Callable[[int, int], None] | None = None) -> list[dict]:
        """Rows {"file_name", "classification", "score"}, best first; k None (or more than the labels): all."""
        k = len(self.classes) if not k or k > len(self.classes) else k
        rows = []
        for key, probs in self.iter_probabilities(images, self.txt_embeddings, batch_size, callback):
            rows += self.group_probs(key, probs, k)
        return rows

    def group_probs(self, image_key: str, img_probs: np.ndarray, k: int) -> list[dict]:
        best = np.argsort(-img_probs, kind="stable")[:k]
        return [{"file_name": image_key, "classification": self.classes[i], "score": float(img_probs[i])}
                for i in best]


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Labels mapped to bins; a bin's score is the sum of its labels' probabilities (pybioclip's --bins)."""

    def __init__(self, cls_to_bin: dict[str, str], **kwargs):
        bad = [label for label, b in cls_to_bin.items() if b is None or b != b or not str(b).strip()]
        if bad:
            raise InputError(f"labels without a bin: {bad[:10]} (empty, null or nan are not allowed as bins)")
        self.cls_to_bin = {str(label).strip(): str(b).strip() for label, b in cls_to_bin.items()}
        super().__init__(list(self.cls_to_bin), **kwargs)

    def group_probs(self, image_key: str, img_probs: np.ndarray, k: int) -> list[dict]:
        totals: dict[str, float] = collections.defaultdict(float)
        for label, p in zip(self.classes, img_probs):
            totals[self.cls_to_bin[label]] += float(p)
        best = sorted(totals, key=lambda name: -totals[name])[:k]  # stable: ties keep first-seen order, as heapq
        return [{"file_name": image_key, "classification": name, "score": totals[name]} for name in best]


def embed_images(model: Model, images: Sequence[ImageInput], batch_size: int = 32,
                 preprocess: str | Preprocess | None = "pybioclip",
                 progress: bool = True) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """pybioclip's `embed`: (keys, unnormalised features [N, D], failures) of the images that could be read."""
    classifier = BaseClassifier(model, preprocess=preprocess, progress=progress)
    keys, feats = [], []
    for batch_keys, features in classifier.iter_image_features(images, batch_size, normalize=False):
        keys += batch_keys
        feats.append(features)
    features = np.concatenate(feats) if feats else np.zeros((0, model.config.embed_dim), np.float32)
    if not np.isfinite(features).all():
        raise InputError(f"model {model.source or '(in memory)'}: non-finite image embeddings; the weights are broken")
    return keys, features, classifier.failures
