"""ViT image tower (open_clip `VisionTransformer`): patchify -> [CLS] + positions -> ln_pre -> blocks -> ln_post -> proj."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.errors import InputError
from bioclip_jax.models.config import VisionConfig
from bioclip_jax.models.layers import Transformer, layer_norm, normal


class VisionTransformer(nn.Module):
    cfg: VisionConfig
    embed_dim: int
    quick_gelu: bool = False
    dtype: Any = jnp.float32
    attn_implementation: str | None = "xla"
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float [B, H, W, 3] normalised pixels (NHWC; open_clip takes NCHW). Returns [B, embed_dim] fp32."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise InputError(f"expected images of shape [B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), "
                             f"got {tuple(images.shape)}")
        scale = cfg.width ** -0.5
        x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
                    padding="VALID", use_bias=False, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)  # row-major patches, as torch's flatten(2).permute(0, 2, 1)
        cls = self.param("class_embedding", normal(scale), (cfg.width,))
        pos = self.param("positional_embedding", normal(scale), (cfg.grid ** 2 + 1, cfg.width))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = layer_norm("ln_pre", self.dtype)(x)
        x = Transformer(layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, quick_gelu=self.quick_gelu,
                        causal=False, dtype=self.dtype, attn_implementation=self.attn_implementation,
                        remat=self.remat, scan_layers=self.scan_layers, name="transformer")(x)
        pooled = layer_norm("ln_post", self.dtype)(x[:, 0])
        proj = self.param("proj", normal(scale), (cfg.width, self.embed_dim))
        return (pooled @ proj.astype(self.dtype)).astype(jnp.float32)
