"""Causal text tower (open_clip's CLIP text side): tokens + positions -> causal blocks -> ln_final -> EOT -> projection."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.errors import InputError
from bioclip_jax.models.config import TextConfig
from bioclip_jax.models.layers import Transformer, layer_norm, normal


class TextTransformer(nn.Module):
    cfg: TextConfig
    embed_dim: int
    quick_gelu: bool = False
    dtype: Any = jnp.float32
    attn_implementation: str | None = "xla"
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, context_length] from `bioclip_jax.tokenize`. Returns [B, embed_dim] fp32."""
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
            raise InputError(f"expected tokens of shape [B, {cfg.context_length}], got {tuple(tokens.shape)}")
        x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=normal(0.02), dtype=self.dtype,
                     name="token_embedding")(tokens)
        pos = self.param("positional_embedding", normal(0.01), (cfg.context_length, cfg.width))
        x = x + pos.astype(self.dtype)
        x = Transformer(layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, quick_gelu=self.quick_gelu,
                        causal=True, dtype=self.dtype, attn_implementation=self.attn_implementation,
                        remat=self.remat, scan_layers=self.scan_layers, name="transformer")(x)
        x = layer_norm("ln_final", self.dtype)(x)
        # The end-of-text token has the largest id (49407), so argmax finds it; causal attention means it has seen
        # the whole caption and nothing after it.
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        proj = self.param("text_projection", normal(cfg.width ** -0.5), (cfg.width, self.embed_dim))
        return (pooled @ proj.astype(self.dtype)).astype(jnp.float32)
