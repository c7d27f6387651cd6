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
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

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


# Attention implementations (BlockConfig.attn_implementation): "xla" above; "splash", TPU Pallas splash attention
# below (on other platforms the XLA path, same result); "cudnn" or None: jax.nn.dot_product_attention's.
ATTN_IMPLEMENTATIONS = ("xla", "splash", "cudnn", None)
# Splash attention tiles keys in blocks of 128 lanes; the sequence is padded to a multiple and the padding masked.
SPLASH_LANES = 128


def _splash_blocks(length: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    # One block over the whole (padded) sequence where it is short (ViT-L/14: 257 tokens -> 384): the fewest grid
    # steps; longer sequences in 512-token blocks, as MaxText's defaults.
    block = length if length <= 512 else next(b for b in (512, 384, 256, 128) if length % b == 0)
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, interpret: bool = False) -> jax.Array:
    """`attention` through the TPU splash kernel (jax.experimental.pallas.ops.tpu), on [B, N, T, H] of one device:
    the [T, T] scores stay in VMEM tiles, never in HBM (XLA's path holds B x N x T x T float32 per layer). Tokens are
    padded to a multiple of 128; the mask drops the padded keys (and the future ones when `causal`), the padded
    query rows are cut off. The kernel softmaxes in float32 whatever the input dtype. `interpret` runs it on any
    platform (slowly), which is how the tests check it against `attention`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    length, head_dim = q.shape[2], q.shape[3]
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    mask = np.zeros((padded, padded), bool)
    mask[:, :length] = True
    if causal:
        mask &= np.tril(np.ones((padded, padded), bool))
    kernel = splash.make_splash_mha_single_device(
        masks.MultiHeadMask([masks.NumpyMask(mask)] * q.shape[1]), block_sizes=_splash_blocks(padded),
        interpret=interpret)
    pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    # The kernel takes no softmax scale: it goes on q (a power of two for head_dim 64, so exact in bf16 too).
    q = jnp.pad(q * jnp.asarray(head_dim ** -0.5, q.dtype), pad)
    out = jax.vmap(kernel)(q, jnp.pad(k, pad), jnp.pad(v, pad))
    return out[:, :, :length]


def sharded_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
                             mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Splash attention on TPU, each device on its own rows of the batch (a Pallas kernel is one device's program:
    without shard_map XLA's partitioner would gather the whole batch onto every chip); the XLA path elsewhere."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "tpu":
        return attention(q, k, v, causal)
    if mesh is None or mesh.size == 1:
        return splash_attention(q, k, v, causal)
    rows = P(tuple(mesh.axis_names))  # the batch over every mesh axis, as the trainer shards it
    return jax.shard_map(lambda q, k, v: splash_attention(q, k, v, causal), mesh=mesh, in_specs=(rows, rows, rows),
                         out_specs=rows, check_vma=False)(q, k, v)


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
    # "xla": plain XLA ops (any device); "splash": TPU Pallas splash attention, the XLA path elsewhere; "cudnn":
    # cuDNN flash attention (GPU, bf16/fp16); None: jax picks.
    attn_implementation: str | None = "xla"
    out_std: float = 0.02  # init scale of the residual-branch outputs (CLIP shrinks it with depth)
    mesh: jax.sharding.Mesh | None = None  # TowerOptions.mesh


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused QKV projection laid out like torch.nn.MultiheadAttention (q, k, v stacked)."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InputError(f"attn_implementation={c.attn_implementation!r}: expected one of "
                             f"{', '.join(map(repr, ATTN_IMPLEMENTATIONS))}")
        heads_first = c.attn_implementation in ("xla", "splash")
        q, k, v = HeadsInProjection(heads=c.heads, heads_first=heads_first, dtype=c.dtype, name="in_proj")(x)
        if c.attn_implementation == "splash":
            out = sharded_splash_attention(q, k, v, c.causal, c.mesh)
        elif heads_first:
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
    # FSDP under scan: maps one layer's params (no layer axis) to where they are used (bioclip_jax/mesh.py's
    # `layer_gather`). Applied inside the loop body, so one layer at a time is gathered, and inside remat, so the
    # backward pass gathers again instead of keeping every gathered layer as a residual.
    gather_layer_params: Callable[[Any], Any] | None = None
    # The devices the step runs on (the trainer's mesh, batch sharded over all its axes): splash attention runs per
    # device under shard_map there, and only where they are TPUs. None: one device, the default backend.
    mesh: jax.sharding.Mesh | None = None


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
                             attn_implementation=self.options.attn_implementation, out_std=out_std,
                             mesh=self.options.mesh)
        if self.options.scan_layers:
            scan = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            x, _ = scan(block_cls(config, name=STACKED_BLOCKS), x, None)
            return x
        for i in range(self.layers):
            x = block_cls(config, name=f"resblocks_{i}")(x)
        return x
