"""Symmetric CLIP loss over the whole global batch (open_clip's --local-loss --gather-with-grad computes the same), and
BioCLIP 2's two-head objective for a batch with replay rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def same_caption(tokens: jax.Array) -> jax.Array:
    """[N, N] bool: rows i != j whose caption tokens are identical (images of one class, captioned alike)."""
    same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
    return same & ~jnp.eye(tokens.shape[0], dtype=bool)


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array,
              replicated: jax.sharding.Sharding | None = None, tokens: jax.Array | None = None) -> jax.Array:
    """Mean of image->text and text->image cross-entropy; features are L2-normalised [N, D], in float32.

    On a mesh the features are sharded along the batch and every example needs every other one as a negative. With
    `replicated` (a fully replicated sharding on the mesh) the step gathers the text features once: each chip then
    holds its rows of the [N, N] logits (its images against all texts). Image->text normalises along those rows,
    locally; text->image normalises each column over all images, which needs only two [N] all-reduces (the column
    max and sum of exponentials), not a second [N, D] gather. The targets, the diagonal, come from the local
    features, reduced to one scalar. The gather's gradient is a reduce-scatter. Without `replicated` XLA picks the
    collectives itself.

    With `tokens` (the captions' token ids, [N, L]) a pair of other rows with the same caption is no negative: each
    image is contrasted with the batch's distinct captions and each caption with the images of other captions (FLYP,
    Goyal et al. 2023; fine-tuning on a few classes puts many images of one class in a batch)."""
    image_features = image_features.astype(jnp.float32)
    text_features = text_features.astype(jnp.float32)
    all_text = text_features if replicated is None else jax.lax.with_sharding_constraint(text_features, replicated)
    logits = logit_scale * image_features @ all_text.T  # rows follow image_features' batch sharding
    if tokens is not None:
        logits = jnp.where(same_caption(tokens), -jnp.inf, logits)
    # The diagonal from the local rows of both towers, and each mean taken on its own: subtracting the (batch-
    # sharded) diagonal from the (replicated) column normalisers element by element would make XLA gather it.
    matching = jnp.mean(logit_scale * jnp.sum(image_features * text_features, axis=-1))
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1)) - matching
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0)) - matching
    return (image_to_text + text_to_image) / 2


def split_replay_rows(x: jax.Array, shards: int, replay_per_shard: int) -> tuple[jax.Array, jax.Array]:
    """(main rows, replay rows) of a batch laid out as `shards` equal blocks (one per device along the batch), each
    holding its main rows first and then `replay_per_shard` replay rows. With one block per device the reshape and
    the slices stay on each device: nothing moves."""
    blocks = x.reshape(shards, -1, *x.shape[1:])
    main = blocks.shape[1] - replay_per_shard
    return (blocks[:, :main].reshape(-1, *x.shape[1:]), blocks[:, main:].reshape(-1, *x.shape[1:]))


def continual_clip_loss(image_features: jax.Array, continual_features: jax.Array, text_features: jax.Array,
                        logit_scale: jax.Array, shards: int, replay_per_shard: int,
                        replicated: jax.sharding.Sharding | None = None,
                        tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """BioCLIP 2's objective (its open_clip fork's ContinualLoss, summed in train.py): a CLIP loss over the main rows'
    `image_features` (through `proj`) and their captions, plus a separate CLIP loss over the replay rows'
    `continual_features` (through `continual_proj`; pass `image_features` again for a one-head model) and their
    captions, one shared logit scale, unweighted sum. Neither group is a negative of the other. Rows are laid out as
    `split_replay_rows` says; `tokens`, as `clip_loss` reads them, in the same layout. Returns (total,
    {"contrastive_loss", "continual_loss"})."""
    main_image, _ = split_replay_rows(image_features, shards, replay_per_shard)
    _, replay_image = split_replay_rows(continual_features, shards, replay_per_shard)
    main_text, replay_text = split_replay_rows(text_features, shards, replay_per_shard)
    main_tokens, replay_tokens = (None, None) if tokens is None else split_replay_rows(tokens, shards, replay_per_shard)
    main = clip_loss(main_image, main_text, logit_scale, replicated, main_tokens)
    replay = clip_loss(replay_image, replay_text, logit_scale, replicated, replay_tokens)
    return main + replay, {"contrastive_loss": main, "continual_loss": replay}
