"""Symmetric CLIP loss over the whole global batch (open_clip's --local-loss --gather-with-grad computes the same)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Mean of image->text and text->image cross-entropy; features are L2-normalised [N, D], in float32.

    On a mesh the operands are sharded along the batch: XLA gathers what each device needs, so every example sees
    every other one as a negative, as when open_clip gathers features with gradients."""
    image_features = image_features.astype(jnp.float32)
    text_features = text_features.astype(jnp.float32)
    logits = logit_scale * image_features @ text_features.T
    labels = jnp.arange(logits.shape[0])
    image_to_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
    return (image_to_text + text_to_image) / 2
