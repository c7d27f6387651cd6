"""Zero-shot class embeddings: each class's name in every prompt template, embedded, averaged and renormalised
(CLIP's prompt ensembling), and the class names of each BioCLIP text type."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.inference.model import Model, encode, normalize_features


def class_embeddings(model: Model, texts_per_class: Sequence[Sequence[str]], batch_size: int = 256) -> np.ndarray:
    """[C, D]: per class, the mean of its L2-normalised caption embeddings, renormalised (CLIP's zero-shot recipe)."""
    flat = [t for texts in texts_per_class for t in texts]
    features = encode(model, texts=flat, batch_size=batch_size)
    out, start = [], 0
    for texts in texts_per_class:
        out.append(features[start:start + len(texts)].mean(axis=0))
        start += len(texts)
    return normalize_features(np.stack(out))


def class_texts(classes: Sequence[str | Taxon], text_type: str = "asis") -> list[str]:
    """The name each class is prompted with: "asis" uses the label as given; other types (sci, com, taxon, sci_com,
    taxon_com, ...) the taxon's name of that type (the caption without "a photo of " and the final period)."""
    names = []
    for c in classes:
        if text_type == "asis":
            names.append(c if isinstance(c, str) else c.scientific_name)
        else:
            if not isinstance(c, Taxon):
                raise InputError(f"text type {text_type!r} needs taxa (ranks, common name) for every class; got {c!r}")
            names.append(c.name(text_type))
    return names


def zero_shot_classifier(model: Model, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, D] class embeddings: every template filled with the class name, embeddings normalised, averaged,
    renormalised (CLIP's prompt ensembling)."""
    if not class_names:
        raise InputError("no class names")
    duplicates = sorted({n for n in class_names if list(class_names).count(n) > 1})
    if duplicates:
        raise InputError(f"duplicate class names {duplicates[:10]}: two classes would get the same embedding")
    return class_embeddings(model, [[t.format(name) for t in templates] for name in class_names])
