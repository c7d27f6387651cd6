"""bioclip_jax: BioCLIP (CLIP for the tree of life) in JAX/Flax.

    model = bioclip_jax.load("path/to/open_clip_folder")  # or a .safetensors/.bin with model="ViT-B-16-quickgelu"
    image_features, text_features = bioclip_jax.encode(model, images=["a.jpg"], texts=["a photo of Pica hudsonia."])
    probs = softmax(model.logit_scale * image_features @ text_features.T)

pybioclip's classes, constants (BIOCLIP_MODEL_STR ...) and Rank, same names and signatures, returning pybioclip's
rows (list[dict]):
    rows = bioclip_jax.TreeOfLifeClassifier(model_str="bioclip").predict(["a.jpg"], bioclip_jax.Rank.FAMILY)

The names load on first use (PEP 562), so `import bioclip_jax` and `bioclip-jax --help` start no JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

# public name -> the module that defines it ("module:name" where the module calls it otherwise)
_EXPORTS = {
    "convert_checkpoint": "bioclip_jax.convert.checkpoint",
    "export_open_clip": "bioclip_jax.convert.checkpoint",
    "save_model": "bioclip_jax.convert.checkpoint",
    "Preprocess": "bioclip_jax.data.transforms",
    "BIOCLIP_MODEL_STR": "bioclip_jax.inference.classify",
    "BIOCLIP_V1_MODEL_STR": "bioclip_jax.inference.classify",
    "BIOCLIP_V2_MODEL_STR": "bioclip_jax.inference.classify",
    "CustomLabelsBinningClassifier": "bioclip_jax.inference.classify",
    "CustomLabelsClassifier": "bioclip_jax.inference.classify",
    "Model": "bioclip_jax.inference.model",
    "create_model": "bioclip_jax.inference.model",
    "encode": "bioclip_jax.inference.model",
    "load": "bioclip_jax.inference.model",
    "Rank": "bioclip_jax.inference.tree_of_life",
    "TreeOfLifeClassifier": "bioclip_jax.inference.tree_of_life",
    "get_model_config": "bioclip_jax.convert.files:load_model_config",
    "list_models": "bioclip_jax.models.config",
    "tokenize": "bioclip_jax.tokenizer",
}
__all__ = ["BIOCLIP_MODEL_STR", "BIOCLIP_V1_MODEL_STR", "BIOCLIP_V2_MODEL_STR", "CustomLabelsBinningClassifier",
           "CustomLabelsClassifier", "Model", "Preprocess", "Rank",
           "TreeOfLifeClassifier", "convert_checkpoint", "create_model", "encode", "export_open_clip",
           "get_model_config", "list_models", "load", "save_model", "tokenize"]

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports on first use
    from bioclip_jax.convert.checkpoint import convert_checkpoint, export_open_clip, save_model
    from bioclip_jax.convert.files import load_model_config as get_model_config
    from bioclip_jax.data.transforms import Preprocess
    from bioclip_jax.inference.classify import (
        BIOCLIP_MODEL_STR,
        BIOCLIP_V1_MODEL_STR,
        BIOCLIP_V2_MODEL_STR,
        CustomLabelsBinningClassifier,
        CustomLabelsClassifier,
    )
    from bioclip_jax.inference.model import Model, create_model, encode, load
    from bioclip_jax.inference.tree_of_life import Rank, TreeOfLifeClassifier
    from bioclip_jax.models.config import list_models
    from bioclip_jax.tokenizer import tokenize


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bioclip_jax' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
