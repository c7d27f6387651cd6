"""Transformer building blocks shared by both towers, named after open_clip's modules.

open_clip's `ResidualAttentionBlock` is pre-LN: x + attn(ln_1(x)); x + mlp(ln_2(x)). Parameter names (`ln_1`,
`attn.in_proj`, `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`) mirror its state_dict so the converter is a table.
Submodules are built with keyword arguments only: two fields of the same type swapped by a reordering would otherwise
build a different network without an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioclip_jax.errors import InputError
from bioclip_jax.models.scan import STACKED_BLOCKS

# PyTorch's LayerNorm default; Flax's is 1e-6, which would drift from open_clip's outputs.
LN_EPS = 1e-5

# Rematerialisation policies by name (what to keep from the forward pass; the rest is recomputed in the backward).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # keep nothing but the block inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute elementwise
    "dots_all": jax.checkpoint_policies.checkpoint_dots,  # also keep batched matmuls (attention scores)
}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, which BioCLIP's weights were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    # torch.nn.GELU() is the erf form; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def normal(stddev: float) -> Callable:
    return nn.initializers.normal(stddev=stddev)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Softmax attention on [B, N, T, H] (heads before tokens: XLA's CPU batched matmuls are faster in this layout
    than in [B, T, N, H], docs/performance.md). Scores are softmaxed in float32 whatever the compute dtype."""
    scores = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if causal:
        length = q.shape[2]
        scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsh->bnth", weights, v)


class HeadsInProjection(nn.Module):
    """torch.nn.MultiheadAttention's fused QKV projection (kernel [width, 3 * width], q, k, v stacked, as nn.Dense would
    store it), computed by one einsum straight into per-head layout: reshaping and transposing a Dense output instead
    makes XLA's CPU backward pass pay for the transposes (docs/performance.md, "What moved the numbers")."""

    heads: int
    heads_first: bool  # [3, B, N, T, H] if True, else [3, B, T, N, H]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.heads
        kernel = self.param("kernel", normal(width ** -0.5), (width, 3 * width))
        bias = self.param("bias", nn.initializers.zeros, (3 * width,))
        kernel = kernel.astype(self.dtype).reshape(width, 3, self.heads, head_dim)
        bias = bias.astype(self.dtype).reshape(3, 1, self.heads, head_dim)
        if self.heads_first:
            return jnp.einsum("btw,wcnh->cbnth", x.astype(self.dtype), kernel) + bias[:, :, :, None]
        return jnp.einsum("btw,wcnh->cbtnh", x.astype(self.dtype), kernel) + bias[:, :, None]


class HeadsOutProjection(nn.Module):
    """The output projection (kernel [width, width], as nn.Dense), contracting heads and head_dim in one einsum."""

    heads_first: bool  # input [B, N, T, H] if True, else [B, T, N, H]
    dtype: Any = jnp.float32
    out_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim = (x.shape[1], x.shape[3]) if self.heads_first else x.shape[2:]
        width = heads * head_dim
        kernel = self.param("kernel", normal(self.out_std), (width, width))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        kernel = kernel.astype(self.dtype).reshape(heads, head_dim, width)
        spec = "bnth,nhw->btw" if self.heads_first else "btnh,nhw->btw"
        return jnp.einsum(spec, x.astype(self.dtype), kernel) + bias.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Everything a residual block and its parts need, in one place: modules take it whole, so no two of them can
    list (and order) these fields differently."""

    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    causal: bool = False
    dtype: Any = jnp.float32
    # "xla": plain XLA ops (any device); "cudnn": cuDNN flash attention (GPU, bf16/fp16); None: jax picks.
    attn_implementation: str | None = "xla"
    out_std: float = 0.02  # init scale of the residual-branch outputs (CLIP shrinks it with depth)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused QKV projection laid out like torch.nn.MultiheadAttention (q, k, v stacked)."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        heads_first = c.attn_implementation == "xla"
        q, k, v = HeadsInProjection(heads=c.heads, heads_first=heads_first, dtype=c.dtype, name="in_proj")(x)
        if heads_first:
            out = attention(q, k, v, c.causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=c.causal, implementation=c.attn_implementation)
        return HeadsOutProjection(heads_first=heads_first, dtype=c.dtype, out_std=c.out_std, name="out_proj")(out)


class MLP(nn.Module):
    config: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        width = x.shape[-1]
        x = nn.Dense(int(width * c.mlp_ratio), dtype=c.dtype, kernel_init=normal((2 * width) ** -0.5), name="c_fc")(x)
        x = quick_gelu(x) if c.quick_gelu else exact_gelu(x)
        return nn.Dense(width, dtype=c.dtype, kernel_init=normal(c.out_std), name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    config: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.config.dtype
        x = x + MultiHeadAttention(self.config, name="attn")(layer_norm("ln_1", dtype)(x))
        return x + MLP(self.config, name="mlp")(layer_norm("ln_2", dtype)(x))


@dataclasses.dataclass(frozen=True)
class TowerOptions:
    """How a tower computes (not what it is: that is its VisionConfig / TextConfig): the same for both towers."""

    embed_dim: int
    quick_gelu: bool = False
    dtype: Any = jnp.float32  # compute dtype; params stay float32
    attn_implementation: str | None = "xla"
    remat: str | None = None  # a key of REMAT_POLICIES, or None for no rematerialisation
    scan_layers: bool = False
    # FSDP under scan: maps one layer's params (no layer axis) to where they are used (train/sharding.py's
    # `layer_gather`). Applied inside the loop body, so one layer at a time is gathered, and inside remat, so the
    # backward pass gathers again instead of keeping every gathered layer as a residual.
    gather_layer_params: Callable[[Any], Any] | None = None


def _scan_body(block: nn.Module, x: jax.Array, _) -> tuple[jax.Array, None]:
    # nn.scan's step function: the carry is the residual stream; no per-layer inputs or outputs.
    return block(x), None


class Transformer(nn.Module):
    """A stack of residual blocks named `resblocks_{i}` (open_clip: `transformer.resblocks.{i}`).

    With `scan_layers` the blocks run under `nn.scan`: one block is traced and compiled once for all layers, and
    every block parameter is stored once under `resblocks` with a leading layer axis (`models/scan.py` converts
    between the two layouts). Each layer is initialised with its own key, from the same distributions."""

    layers: int
    heads: int
    mlp_ratio: float
    causal: bool
    options: "TowerOptions"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = ResidualAttentionBlock
        if self.options.scan_layers and self.options.gather_layer_params is not None:
            gather = self.options.gather_layer_params
            block_cls = nn.map_variables(block_cls, "params", init=self.is_initializing(),
                                         trans_in_fn=lambda v: v if self.is_initializing() else gather(v))
        remat = self.options.remat
        if remat:
            if remat not in REMAT_POLICIES:
                raise InputError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)} or None")
            # Under scan the loop boundary already keeps XLA from merging the recomputation into the forward pass
            # (jax.checkpoint's documentation), so CSE prevention would only cost.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not self.options.scan_layers)
        # CLIP's initialisation: residual-branch outputs shrink with depth so the stack starts near identity.
        out_std = x.shape[-1] ** -0.5 * (2 * self.layers) ** -0.5
        config = BlockConfig(heads=self.heads, mlp_ratio=self.mlp_ratio, quick_gelu=self.options.quick_gelu,
                             causal=self.causal, dtype=self.options.dtype,
                             attn_implementation=self.options.attn_implementation, out_std=out_std)
        if self.options.scan_layers:
            scan = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            x, _ = scan(block_cls(config, name=STACKED_BLOCKS), x, None)
            return x
        for i in range(self.layers):
            x = block_cls(config, name=f"resblocks_{i}")(x)
        return x
