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
import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from bioclip_jax.convert.hub import HUB_PREFIX, TXT_EMB_REPOS, download_dataset_file, hub_repo_id
from bioclip_jax.data.transforms import ImageInput, Preprocess, load_image, to_rgb
from bioclip_jax.errors import InputError
from bioclip_jax.inference.model import (
    Model,
    as_image_list,
    iter_image_features,
    load,
    normalize_features,
    on_device,
    pick_preprocess,
)
from bioclip_jax.inference.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import zero_shot_classifier
from bioclip_jax.tokenizer import tokenize

# pybioclip's constants (bioclip/_constants.py and predict.py), same names and values.
BIOCLIP_V1_MODEL_STR = "hf-hub:imageomics/bioclip"
BIOCLIP_V2_MODEL_STR = "hf-hub:imageomics/bioclip-2"
BIOCLIP_MODEL_STR = BIOCLIP_V2_MODEL_STR  # pybioclip's default model
TOL10M_HF_DATAFILE_REPO = TXT_EMB_REPOS["imageomics/bioclip"]
TOL200M_HF_DATAFILE_REPO = TXT_EMB_REPOS["imageomics/bioclip-2"]
HF_DATAFILE_REPO_TYPE = "dataset"
TOL_MODELS = {HUB_PREFIX + model: data for model, data in TXT_EMB_REPOS.items()}
DEFAULT_BATCH_SIZE = 10
PRED_FILENAME_KEY = "file_name"
PRED_CLASSICATION_KEY = "classification"  # pybioclip's spelling
PRED_SCORE_KEY = "score"
BIN_VALUE_ERROR = "Empty, null, or nan are not allowed for bin values."


def get_tol_repo_id(model_str: str) -> str:
    """The dataset repository of the species embeddings for a BioCLIP release (our aliases bioclip and bioclip-2
    too); other models are pybioclip's ValueError."""
    try:
        repo_id = hub_repo_id(model_str) if model_str else None
    except InputError:  # a malformed hf-hub: name is simply not a supported model, as in pybioclip
        repo_id = None
    if repo_id not in TXT_EMB_REPOS:
        raise InputError(f"TreeOfLife predictions are only supported for the following models: "
                         f"{', '.join(TOL_MODELS.keys())}")
    return TXT_EMB_REPOS[repo_id]


def ensure_tol_supported_model(model_str: str) -> None:
    """pybioclip's check: a ValueError (InputError) unless `model_str` has published species embeddings."""
    get_tol_repo_id(model_str)


def create_bioclip_tokenizer(model_name: str = "ViT-B-16", context_length: int = 77) -> Callable:
    """texts -> token ids [N, context_length] (numpy int). Every BioCLIP model uses CLIP's tokenizer, so
    `model_name` is accepted for pybioclip's signature only."""
    def tokenizer(texts: str | Sequence[str]) -> np.ndarray:
        return tokenize(texts, context_length=context_length)

    return tokenizer


def image_key(image: ImageInput, index: int) -> str:
    """pybioclip's key: the path for files, the position for in-memory images."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(index)


def recorded_images(images) -> list:
    """The images as a prediction log lists them: paths as strings, in-memory images as given."""
    return [os.fspath(i) if isinstance(i, os.PathLike) else i for i in as_image_list(images)]


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
    """The loaded model, its preprocessing and the image loop shared by pybioclip's classifiers, with pybioclip's
    methods. Features and probabilities are numpy arrays where pybioclip returns torch tensors."""

    def __init__(self, model_str: str | os.PathLike | Model | None = BIOCLIP_MODEL_STR,
                 pretrained_str: str | None = None, device: Any = None, *,
                 preprocess: str | Preprocess | None = "pybioclip", progress: bool = True):
        # What a prediction log records: the device asked for, else the platform JAX places the model on.
        self.device = device if device is not None else jax.devices()[0].platform
        self._device_arg = device
        self._preprocess_arg = preprocess
        self.load_pretrained_model(model_str=model_str, pretrained_str=pretrained_str)
        self.progress = progress
        self.failures: dict[str, str] = {}
        self.recorder = None

    def load_pretrained_model(self, model_str: str | os.PathLike | Model | None = BIOCLIP_MODEL_STR,
                              pretrained_str: str | None = None) -> None:
        """Loads (or replaces) the model; sets model_str, pretrained_str, model and preprocess as pybioclip."""
        self.model = load_model(model_str, pretrained_str, self._device_arg)
        self.model_str = self.model.source if isinstance(model_str, Model) else os.fspath(model_str or
                                                                                           BIOCLIP_MODEL_STR)
        self.pretrained_str = pretrained_str
        self.preprocess = pick_preprocess(self.model, self._preprocess_arg)

    def set_recorder(self, recorder) -> None:
        self.recorder = recorder

    def record_event(self, images, **kwargs) -> None:
        """Hands one predict call to the attached prediction recorder (see inference/recorder.py), if any."""
        if self.recorder:
            self.recorder.add_prediction(images, **kwargs)

    @staticmethod
    def ensure_rgb_image(image: str | os.PathLike | Image.Image) -> Image.Image:
        """A path or PIL image as an RGB PIL image (unreadable files raise, as in pybioclip)."""
        return to_rgb(load_image(image))

    @staticmethod
    def make_key(image: ImageInput, idx: int) -> str:
        return image_key(image, idx)

    def iter_image_features(self, images, batch_size: int = DEFAULT_BATCH_SIZE, normalize: bool = True,
                            callback: Callable[[int, int], None] | None = None
                            ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, features [B', D]) per batch, streaming; unreadable images go into `self.failures`."""
        images = as_image_list(images)
        if not batch_size or batch_size < 1:
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

    def create_image_features_for_image(self, image: str | os.PathLike | Image.Image, normalize: bool) -> np.ndarray:
        """[D] features of one image; an unreadable image raises."""
        return self.create_image_features([self.ensure_rgb_image(image)], normalize=normalize)[0]

    def create_probabilities(self, img_features: np.ndarray, txt_features: np.ndarray) -> np.ndarray:
        """softmax over classes of exp(logit_scale) * img_features [N, D] @ txt_features [D, C] -> [N, C]."""
        return zero_shot_probabilities(self.model, np.asarray(img_features), np.asarray(txt_features))

    def create_probabilities_for_images(self, images: Sequence[ImageInput], keys: Sequence[str],
                                        txt_features: np.ndarray) -> dict[str, np.ndarray]:
        """{key: probabilities [C]} for one batch; an unreadable image raises."""
        features = self.create_image_features([self.ensure_rgb_image(i) for i in images], batch_size=len(images))
        return dict(zip(keys, self.create_probabilities(features, txt_features)))

    def create_batched_probabilities_for_images(self, images: Sequence[ImageInput], txt_features: np.ndarray,
                                                batch_size: int | None,
                                                callback: Callable[[int, int], None] | None = None
                                                ) -> dict[str, np.ndarray]:
        """{key: probabilities [C]} of every readable image, `batch_size` at a time (None: one batch)."""
        return dict(self.iter_probabilities(images, txt_features, batch_size, callback))

    def iter_probabilities(self, images, text_matrix: np.ndarray, batch_size: int | None,
                           callback: Callable[[int, int], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(key, softmax probabilities [C]) per readable image, one batch in memory at a time."""
        for keys, features in self.iter_image_features(images, batch_size, callback=callback):
            yield from zip(keys, zero_shot_probabilities(self.model, features, text_matrix))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed images [B, H, W, 3] (what `self.preprocess` makes) -> probabilities [B, C] over
        `self.txt_embeddings`."""
        features = normalize_features(self.model.encode_pixels(np.asarray(x, np.float32)))
        return self.create_probabilities(features, self.txt_embeddings)

    __call__ = forward

    def get_tol_repo_id(self) -> str:
        return get_tol_repo_id(self.model_str)

    def get_cached_datafile(self, filename: str) -> str:
        """The local path of a file of this model's species-embedding dataset repository (downloaded once)."""
        return str(download_dataset_file(self.get_tol_repo_id(), filename))

    def get_txt_emb(self) -> np.ndarray:
        """The species text embeddings [D, N] (txt_emb_species.npy)."""
        return np.load(self.get_cached_datafile("embeddings/txt_emb_species.npy"), allow_pickle=False)

    def get_txt_names(self) -> list[list]:
        """The species names as stored (txt_emb_species.json): [[kingdom, ..., species_epithet], common_name]."""
        with open(self.get_cached_datafile("embeddings/txt_emb_species.json"), encoding="utf-8") as f:
            return json.load(f)


class CustomLabelsClassifier(BaseClassifier):
    """Zero-shot over user labels: each label's embedding is the renormalised mean of its 80 template embeddings."""

    def __init__(self, cls_ary: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = create_bioclip_tokenizer(self.model_str, self.model.config.text.context_length)
        self.classes = [str(label).strip() for label in cls_ary]
        empty = [i for i, label in enumerate(self.classes) if not label]
        if not self.classes or empty:
            raise InputError(f"labels must be non-empty strings; got {len(self.classes)} labels, empty at {empty}")
        self.txt_embeddings = zero_shot_classifier(self.model, self.classes, templates).T  # [D, C] as pybioclip

    def predict(self, images: Sequence[ImageInput] | ImageInput, k: int | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE,
                callback: Callable[[int, int], None] | None = None) -> list[dict]:
        """Rows {"file_name", "classification", "score"}, best first; k None (or more than the labels): all."""
        images = as_image_list(images)
        if images:  # pybioclip settles k per image, so with no images the log keeps the k asked for
            k = len(self.classes) if not k or k > len(self.classes) else k
        rows = []
        for key, probs in self.iter_probabilities(images, self.txt_embeddings, batch_size, callback):
            rows += self.group_probs(key, probs, k)
        self.record_event(images=recorded_images(images), k=k, batch_size=batch_size)
        return rows

    def group_probs(self, image_key: str, img_probs: np.ndarray, k: int | None = None) -> list[dict]:
        best = np.argsort(-img_probs, kind="stable")[:k]
        return [{PRED_FILENAME_KEY: image_key, PRED_CLASSICATION_KEY: self.classes[i],
                 PRED_SCORE_KEY: float(img_probs[i])} for i in best]


def is_empty_bin(value: Any) -> bool:
    """pybioclip's test for a bin value it refuses: empty, None, NaN, pandas NA/NaT."""
    import pandas as pd  # pybioclip's own test (pd.isna), so every null it refuses is refused here

    missing = pd.isna(value)
    return bool(missing) if isinstance(missing, (bool, np.bool_)) and missing else not value


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Labels mapped to bins; a bin's score is the sum of its labels' probabilities (pybioclip's --bins). Bin names
    are kept as given; an empty, null or NaN bin is pybioclip's ValueError (checked before the model loads)."""

    def __init__(self, cls_to_bin: dict, **kwargs):
        if any(is_empty_bin(b) for b in cls_to_bin.values()):
            raise InputError(BIN_VALUE_ERROR)
        self.cls_to_bin = {str(label).strip(): b for label, b in cls_to_bin.items()}
        super().__init__(list(self.cls_to_bin), **kwargs)

    def group_probs(self, image_key: str, img_probs: np.ndarray, k: int | None = None) -> list[dict]:
        totals: dict[Any, float] = collections.defaultdict(float)
        for label, p in zip(self.classes, img_probs):
            totals[self.cls_to_bin[label]] += float(p)
        best = sorted(totals, key=lambda name: -totals[name])[:k]  # stable: ties keep first-seen order, as heapq
        return [{PRED_FILENAME_KEY: image_key, PRED_CLASSICATION_KEY: name, PRED_SCORE_KEY: totals[name]}
                for name in best]


def predict_classifications_from_list(img: ImageInput, cls_ary: Sequence[str], device: Any = None) -> list[dict]:
    """pybioclip's one-call custom-label prediction for one image with its default model."""
    return CustomLabelsClassifier(cls_ary=cls_ary, device=device).predict([img])


def embed_images(model: Model, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH_SIZE,
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
