"""AdamW with open_clip's weight-decay mask, linear warmup then cosine to zero, and a guard on non-finite grads; for
fine-tuning, a mask of the params that train (the rest frozen: no update, no optimizer state)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from bioclip_jax.convert.state_dict import torch_key
from bioclip_jax.errors import InputError
from bioclip_jax.models.scan import STACKED_BLOCKS
from bioclip_jax.train.lora import LORA_A, LORA_B

# What trains (train.trainable): every param; the image tower and the logit scale (the text tower frozen, as
# open_clip's --lock-text freezes it: embeddings, blocks, ln_final, text_projection); or only the LoRA pairs
# (train/lora.py).
TRAINABLE = ("all", "vision", "lora")

MAX_LOGIT_SCALE = math.log(100.0)


def decay_mask(params) -> dict:
    """True where weight decay applies. open_clip excludes params with ndim < 2 or whose name contains "ln", "bias"
    or "logit_scale" (so positional embeddings, proj, text_projection and the token embedding ARE decayed); the
    rule is applied to the open_clip names of our params so both stacks decay the same tensors. Stacked blocks
    (scan_layers) carry a leading layer axis, which does not count: the rule is per layer."""
    flat = traverse_util.flatten_dict(params)

    def decays(path, value) -> bool:
        name = torch_key(path)
        ndim = value.ndim - 1 if STACKED_BLOCKS in path else value.ndim
        return ndim >= 2 and not any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    return traverse_util.unflatten_dict({path: decays(path, value) for path, value in flat.items()})


def trainable_mask(params, trainable: str = "all") -> dict:
    """True for the params that train under `trainable` (one of TRAINABLE), False for frozen ones."""
    if trainable not in TRAINABLE:
        raise InputError(f"train.trainable={trainable!r}: expected one of {', '.join(TRAINABLE)}")
    flat = traverse_util.flatten_dict(params)
    rules = {"all": lambda path: True, "vision": lambda path: path[0] in ("visual", "logit_scale"),
             "lora": lambda path: path[-1] in (LORA_A, LORA_B)}
    mask = {path: rules[trainable](path) for path in flat}
    if not any(mask.values()):
        raise InputError(f"train.trainable={trainable!r}: no param trains (LoRA needs train.lora_rank > 0)")
    return traverse_util.unflatten_dict(mask)


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int):
    """open_clip's cosine_lr: lr = base * (step + 1) / warmup during warmup, then half a cosine down to 0."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0))) * base_lr
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def make_optimizer(params, *, lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.2,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6, grad_clip_norm: float | None = None,
                   trainable: dict | None = None):
    """The BioCLIP recipe's AdamW. Updates with non-finite gradients are skipped (params and moments untouched) and
    counted in the state (`optax.apply_if_finite`'s total_notfinite). `trainable` (a `trainable_mask`): frozen
    params get no update and no Adam moments (optax.multi_transform), what makes LoRA's optimizer state small."""
    schedule = warmup_cosine(lr, warmup_steps, total_steps)
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params)))
    tx = optax.chain(*chain)
    if trainable is not None and not all(jax.tree_util.tree_leaves(trainable)):
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000), schedule


def skipped_updates(opt_state) -> jax.Array:
    return opt_state.total_notfinite


def clamp_logit_scale(params: dict) -> dict:
    """After every step, as open_clip: logit_scale in [0, ln 100]."""
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
