"""ViT image tower (open_clip `VisionTransformer`): patchify -> [CLS] + positions -> ln_pre -> blocks -> ln_post ->
proj."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.errors import InputError
from bioclip_jax.models.config import VisionConfig
from bioclip_jax.models.layers import TowerOptions, Transformer, layer_norm, normal


class VisionTransformer(nn.Module):
    """open_clip's `visual`; params `conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `transformer`,
    `ln_post`, `proj`, and with `continual_proj` BioCLIP 2's second head of that name (its fork's
    transformer.py: `pooled @ continual_proj` on the same pooled [CLS] token as `proj`)."""

    cfg: VisionConfig
    options: TowerOptions
    continual_proj: bool = False

    @nn.compact
    def __call__(self, images: jax.Array):
        """images: float [B, H, W, 3] normalised pixels (NHWC; open_clip takes NCHW). Returns [B, embed_dim] fp32;
        with `continual_proj`, a pair: (through `proj`, through `continual_proj`)."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise InputError(f"expected images of shape [B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), "
                             f"got {tuple(images.shape)}")
        scale = cfg.width ** -0.5
        x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
                    padding="VALID", use_bias=False, dtype=self.options.dtype,
                    name="conv1")(images.astype(self.options.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)  # row-major patches, as torch's flatten(2).permute(0, 2, 1)
        cls = self.param("class_embedding", normal(scale), (cfg.width,))
        pos = self.param("positional_embedding", normal(scale), (cfg.grid ** 2 + 1, cfg.width))
        cls = jnp.broadcast_to(cls.astype(self.options.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.options.dtype)
        x = layer_norm("ln_pre", self.options.dtype)(x)
        x = Transformer(layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, causal=False,
                        options=self.options, name="transformer")(x)
        pooled = layer_norm("ln_post", self.options.dtype)(x[:, 0])
        proj = self.param("proj", normal(scale), (cfg.width, self.options.embed_dim))
        features = (pooled @ proj.astype(self.options.dtype)).astype(jnp.float32)
        if not self.continual_proj:
            return features
        continual = self.param("continual_proj", normal(scale), (cfg.width, self.options.embed_dim))
        return features, (pooled @ continual.astype(self.options.dtype)).astype(jnp.float32)
