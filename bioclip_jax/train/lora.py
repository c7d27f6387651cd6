"""LoRA (Hu et al., 2021) on the attention and MLP weights of both towers' residual blocks: each targeted kernel W
[in, out] gets a pair A [in, r] (small random) and B [r, out] (zeros) stored next to it (`lora_a`, `lora_b`), the
forward pass uses W + A @ B, and only A and B train (the optimizer's `trainable_mask`). `merge_lora` folds them into
plain weights, so an exported model is an ordinary CLIP that open_clip and pybioclip load.

Both layouts work: per layer ([in, out]) and stacked by scan_layers ([L, in, out] with A [L, in, r], B [L, r, out]).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

LORA_A, LORA_B = "lora_a", "lora_b"
TARGETS = ("in_proj", "out_proj", "c_fc", "c_proj")  # attention's fused QKV and output, the MLP's two layers


def add_lora(params: Mapping, rank: int, seed: int = 0) -> dict:
    """`params` with A (normal, std 1/sqrt(in), as LoRA's Kaiming-style init) and B (zeros) next to every targeted
    kernel inside a transformer's blocks: at the start the model computes exactly what `params` did."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    keys = iter(jax.random.split(jax.random.key(seed), 4096))

    def visit(node: Mapping, in_blocks: bool) -> dict:
        out: dict[str, Any] = {}
        for name, value in node.items():
            if not isinstance(value, Mapping):
                out[name] = value
                continue
            inside = in_blocks or name.startswith("resblocks")
            if inside and name in TARGETS and "kernel" in value:
                kernel = value["kernel"]
                *lead, fan_in, fan_out = kernel.shape
                a = jax.random.normal(next(keys), (*lead, fan_in, rank), jnp.float32) * fan_in ** -0.5
                out[name] = {**value, LORA_A: a, LORA_B: jnp.zeros((*lead, rank, fan_out), jnp.float32)}
            else:
                out[name] = visit(value, inside)
        return out

    return visit(params, False)


def has_lora(params: Mapping) -> bool:
    return any(LORA_A in node if isinstance(node, Mapping) else False for node in _nodes(params))


def merge_lora(params: Mapping) -> dict:
    """Plain params: every kernel with a LoRA pair becomes W + A @ B and the pair is dropped (a no-op without
    LoRA). Works on numpy, jax arrays and tracers (the train step merges before every forward pass)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping) and LORA_A in value:
            rest = {k: v for k, v in value.items() if k not in (LORA_A, LORA_B)}
            kernel = rest["kernel"]
            rest["kernel"] = kernel + jnp.matmul(value[LORA_A], value[LORA_B]).astype(kernel.dtype)
            out[name] = rest
        elif isinstance(value, Mapping):
            out[name] = merge_lora(value)
        else:
            out[name] = value
    return out


def _nodes(params: Mapping):
    yield params
    for value in params.values():
        if isinstance(value, Mapping):
            yield from _nodes(value)
