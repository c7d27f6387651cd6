"""Two-tower CLIP: image and text encoders projected to one space, with a learned temperature stored as a log."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.layers import TowerOptions
from bioclip_jax.models.text import TextTransformer
from bioclip_jax.models.vision import VisionTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)


def init_inputs(config: CLIPConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images [B, S, S, 3] and tokens [B, L]: what `CLIP.init` (or `jax.eval_shape` of it) needs to build the
    params of `config`."""
    size = config.vision.image_size
    return (jnp.zeros((batch, size, size, 3), jnp.float32), jnp.zeros((batch, config.text.context_length), jnp.int32))


def init_params(config: CLIPConfig, seed: int = 0, scan_layers: bool = False, continual_proj: bool = False) -> dict:
    """Freshly initialised params (CLIP's initialisation); stacked per tower with `scan_layers`; with BioCLIP 2's
    `visual/continual_proj` head with `continual_proj`."""
    module = CLIP(config, scan_layers=scan_layers, continual_proj=continual_proj)
    return module.init(jax.random.key(seed), *init_inputs(config))["params"]


CONTINUAL_PROJ = ("visual", "continual_proj")


def add_continual_proj(params: dict) -> dict:
    """params with `visual/continual_proj` (BioCLIP 2's replay head); where missing, a copy of `visual/proj`, as
    BioCLIP 2's open_clip fork starts it from weights without one (factory.py, load_checkpoint)."""
    if CONTINUAL_PROJ[1] in params["visual"]:
        return params
    return {**params, "visual": {**params["visual"], CONTINUAL_PROJ[1]: params["visual"]["proj"]}}


def without_continual_proj(params):
    """params without `visual/continual_proj`: what inference, evaluation and export use (BioCLIP 2's released
    weights hold no such key: they load in unmodified open_clip, whose loading is strict)."""
    if CONTINUAL_PROJ[1] not in params.get("visual", {}):
        return params
    visual = {k: v for k, v in params["visual"].items() if k != CONTINUAL_PROJ[1]}
    return {**params, "visual": visual}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # Matches torch.nn.functional.normalize (divide by max(norm, eps)).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
    """params = {"visual": ..., "text": ..., "logit_scale": ()}. Call with `method="encode_image"` / `"encode_text"`."""

    config: CLIPConfig
    dtype: Any = jnp.float32  # compute dtype; params stay float32
    attn_implementation: str | None = "xla"
    remat: str | None = None
    scan_layers: bool = False  # blocks under nn.scan, params stacked per tower (models/scan.py)
    gather_layer_params: Callable[[Any], Any] | None = None  # FSDP under scan (TowerOptions.gather_layer_params)
    continual_proj: bool = False  # BioCLIP 2's second visual head, for the replay rows (training only)
    mesh: Any = None  # the step's jax.sharding.Mesh, where splash attention runs per device (TowerOptions.mesh)

    def setup(self):
        c = self.config
        options = TowerOptions(embed_dim=c.embed_dim, quick_gelu=c.quick_gelu, dtype=self.dtype,
                               attn_implementation=self.attn_implementation, remat=self.remat,
                               scan_layers=self.scan_layers, gather_layer_params=self.gather_layer_params,
                               mesh=self.mesh)
        self.visual = VisionTransformer(cfg=c.vision, options=options, continual_proj=self.continual_proj)
        self.text = TextTransformer(cfg=c.text, options=options)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(INIT_LOGIT_SCALE), ())

    def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.visual(images)
        if self.continual_proj:
            features = features[0]
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.text(tokens)
        return l2_normalize(features) if normalize else features

    def __call__(self, images: jax.Array, tokens: jax.Array):
        """Returns (normalised image features, normalised text features, exp(logit_scale)), as open_clip's CLIP; with
        `continual_proj`, a fourth item: the normalised features of every image through `continual_proj` (BioCLIP
        2's fork returns them next to the others for every row; the loss picks the replay rows)."""
        text, scale = self.encode_text(tokens, normalize=True), jnp.exp(self.logit_scale)
        if not self.continual_proj:
            return self.encode_image(images, normalize=True), text, scale
        image, continual = self.visual(images)
        return l2_normalize(image), text, scale, l2_normalize(continual)
