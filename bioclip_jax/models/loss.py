"""Symmetric CLIP loss over the whole global batch (open_clip's --local-loss --gather-with-grad computes the same)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array,
              replicated: jax.sharding.Sharding | None = None) -> jax.Array:
    """Mean of image->text and text->image cross-entropy; features are L2-normalised [N, D], in float32.

    On a mesh the features are sharded along the batch and every example needs every other one as a negative. With
    `replicated` (a fully replicated sharding on the mesh) the step gathers the text features once: each chip then
    holds its rows of the [N, N] logits (its images against all texts). Image->text normalises along those rows,
    locally; text->image normalises each column over all images, which needs only two [N] all-reduces (the column
    max and sum of exponentials), not a second [N, D] gather. The targets, the diagonal, come from the local
    features, reduced to one scalar. The gather's gradient is a reduce-scatter. Without `replicated` XLA picks the
    collectives itself."""
    image_features = image_features.astype(jnp.float32)
    text_features = text_features.astype(jnp.float32)
    all_text = text_features if replicated is None else jax.lax.with_sharding_constraint(text_features, replicated)
    logits = logit_scale * image_features @ all_text.T  # rows follow image_features' batch sharding
    # The diagonal from the local rows of both towers, and each mean taken on its own: subtracting the (batch-
    # sharded) diagonal from the (replicated) column normalisers element by element would make XLA gather it.
    matching = jnp.mean(logit_scale * jnp.sum(image_features * text_features, axis=-1))
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1)) - matching
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0)) - matching
    return (image_to_text + text_to_image) / 2
