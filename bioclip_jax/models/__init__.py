"""Flax CLIP towers with open_clip's architecture and parameter names."""

from bioclip_jax.models.clip import CLIP, l2_normalize
from bioclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "get_model_config", "l2_normalize", "list_models"]
