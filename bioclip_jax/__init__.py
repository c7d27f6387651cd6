"""bioclip_jax: BioCLIP (CLIP for the tree of life) in JAX/Flax.

    model = bioclip_jax.load("path/to/open_clip_folder")           # or a .safetensors/.bin with model="ViT-B-16-quickgelu"
    image_features, text_features = bioclip_jax.encode(model, images=["a.jpg"], texts=["a photo of Pica hudsonia."])
    probs = softmax(model.logit_scale * image_features @ text_features.T)

pybioclip's classes, same names and signatures, returning pybioclip's rows (list[dict]):
    rows = bioclip_jax.TreeOfLifeClassifier(model_str="bioclip").predict(["a.jpg"], bioclip_jax.Rank.FAMILY)
"""

from bioclip_jax.convert.checkpoint import convert_checkpoint, export_open_clip, save_model
from bioclip_jax.convert.files import load_model_config as get_model_config
from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier
from bioclip_jax.inference.model import Model, create_model, encode, load
from bioclip_jax.inference.tree_of_life import Rank, TreeOfLifeClassifier
from bioclip_jax.models.config import list_models
from bioclip_jax.tokenizer import tokenize

__version__ = "0.1.0"
__all__ = ["CustomLabelsBinningClassifier", "CustomLabelsClassifier", "Model", "Preprocess", "Rank",
           "TreeOfLifeClassifier", "convert_checkpoint", "create_model", "encode", "export_open_clip",
           "get_model_config", "list_models", "load", "save_model", "tokenize"]
