"""A linear probe: multinomial logistic regression on frozen, L2-normalised image embeddings (the baseline pybioclip
documents with scikit-learn's LogisticRegression), fitted, saved as `probe.json` next to the model and used by
`ProbeClassifier` (`bioclip-jax predict --probe`).

    probe.json: {"format": "bioclip_jax linear probe", "version": 1, "classes": [C names],
                 "weight": [C rows of D floats], "bias": [C floats]}
Plain JSON: nothing executable is read back (never a pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bioclip_jax import paths
from bioclip_jax.data.transforms import ImageInput
from bioclip_jax.errors import InputError
from bioclip_jax.inference.classify import (
    DEFAULT_BATCH_SIZE,
    PRED_CLASSICATION_KEY,
    PRED_FILENAME_KEY,
    PRED_SCORE_KEY,
    BaseClassifier,
    recorded_images,
)
from bioclip_jax.inference.model import as_image_list

PROBE_FILE = "probe.json"
FORMAT = "bioclip_jax linear probe"


@dataclasses.dataclass
class Probe:
    classes: list[str]
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """L2-normalised features [N, D] -> logits [N, C]."""
        return np.asarray(features, np.float32) @ self.weight.T + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(jax.nn.softmax(self.logits(features), axis=-1))

    def save(self, folder: str | os.PathLike) -> str:
        path = paths.resolve(folder) / PROBE_FILE
        paths.write_atomic(path, json.dumps({
            "format": FORMAT, "version": 1, "classes": list(self.classes),
            "weight": self.weight.astype(np.float32).tolist(), "bias": self.bias.astype(np.float32).tolist()}).encode())
        return str(path)


def load_probe(path: str | os.PathLike) -> Probe:
    """probe.json, or a model folder holding one."""
    path = paths.resolve(path)
    if path.is_dir():
        path = path / PROBE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no linear probe at {path} (bioclip-jax finetune --method probe writes one)")
    try:
        data = json.loads(path.read_text())
        weight, bias = np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32)
        classes = [str(c) for c in data["classes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a linear probe file ({type(e).__name__}: {e})") from None
    if data.get("format") != FORMAT or weight.ndim != 2 or weight.shape[0] != len(classes) or \
            bias.shape != (len(classes),):
        raise InputError(f"{path}: not a linear probe file (expected format {FORMAT!r}, weight [C, D], bias [C] "
                         f"for C classes)")
    return Probe(classes, weight, bias)


def fit_probe(features: np.ndarray, labels: Sequence[str], c: float = 1.0, iterations: int = 1000) -> Probe:
    """Multinomial logistic regression with scikit-learn's LogisticRegression(C=c) objective (L2 penalty on the
    weights, not the bias: mean cross-entropy + |W|^2 / (2 c N)), minimised by full-batch Adam in one compiled
    loop (a convex problem of C x D numbers: small to compile, where L-BFGS's line search took seconds)."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InputError(f"a linear probe needs at least 2 classes, got {len(classes)}")
    index = {name: i for i, name in enumerate(classes)}
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray([index[name] for name in labels])
    penalty = 1.0 / (2 * c * len(labels))

    def loss(params):
        logits = x @ params["w"].T + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + penalty * jnp.sum(params["w"] ** 2)

    solver = optax.adam(optax.cosine_decay_schedule(0.1, iterations))

    @jax.jit
    def solve(params):
        def step(_, carry):
            params, state = carry
            updates, state = solver.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state
        return jax.lax.fori_loop(0, iterations, step, (params, solver.init(params)))[0]

    params = solve({"w": jnp.zeros((len(classes), x.shape[1])), "b": jnp.zeros(len(classes))})
    return Probe(classes, np.asarray(params["w"]), np.asarray(params["b"]))


class ProbeClassifier(BaseClassifier):
    """Classifies with a linear probe over the model's image embeddings; rows as CustomLabelsClassifier's."""

    def __init__(self, probe: str | os.PathLike | Probe, **kwargs):
        self.probe = probe if isinstance(probe, Probe) else load_probe(probe)
        super().__init__(**kwargs)
        if self.probe.weight.shape[1] != self.model.config.embed_dim:
            raise InputError(f"the probe takes {self.probe.weight.shape[1]}-d embeddings, the model makes "
                             f"{self.model.config.embed_dim}-d ones: use the model the probe was fitted on")
        self.classes = self.probe.classes

    def predict(self, images: Sequence[ImageInput] | ImageInput, k: int | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE,
                callback: Callable[[int, int], None] | None = None) -> list[dict]:
        images = as_image_list(images)
        k = len(self.classes) if not k or k > len(self.classes) else k
        rows = []
        for keys, features in self.iter_image_features(images, batch_size, callback=callback):
            for key, probs in zip(keys, self.probe.probabilities(features)):
                best = np.argsort(-probs, kind="stable")[:k]
                rows += [{PRED_FILENAME_KEY: key, PRED_CLASSICATION_KEY: self.classes[i],
                          PRED_SCORE_KEY: float(probs[i])} for i in best]
        self.record_event(images=recorded_images(images), k=k, batch_size=batch_size)
        return rows
