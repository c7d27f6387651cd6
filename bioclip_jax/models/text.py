"""Causal text tower (open_clip's CLIP text side): tokens + positions -> causal blocks -> ln_final -> EOT ->
projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.errors import InputError
from bioclip_jax.models.config import TextConfig
from bioclip_jax.models.layers import TowerOptions, Transformer, layer_norm, normal


class TextTransformer(nn.Module):
    """open_clip's text side of CLIP; params `token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
    `text_projection` (plain CLIP keeps them at the state dict's top level)."""

    cfg: TextConfig
    options: TowerOptions

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, context_length] from `bioclip_jax.tokenize`. Returns [B, embed_dim] fp32."""
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
            raise InputError(f"expected tokens of shape [B, {cfg.context_length}], got {tuple(tokens.shape)}")
        x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=normal(0.02), dtype=self.options.dtype,
                     name="token_embedding")(tokens)
        pos = self.param("positional_embedding", normal(0.01), (cfg.context_length, cfg.width))
        x = x + pos.astype(self.options.dtype)
        x = Transformer(layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, causal=True,
                        options=self.options, name="transformer")(x)
        x = layer_norm("ln_final", self.options.dtype)(x)
        # The end-of-text token has the largest id (49407), so argmax finds it; causal attention means it has seen
        # the whole caption and nothing after it.
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        proj = self.param("text_projection", normal(cfg.width ** -0.5), (cfg.width, self.options.embed_dim))
        return (pooled @ proj.astype(self.options.dtype)).astype(jnp.float32)
