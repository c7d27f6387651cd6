"""The device mesh and its shardings, shared by training and inference: a `data` axis over every device of every host;
batches split along it; params replicated or FSDP-sharded over it (each along its largest divisible dimension) and
gathered where they are used."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bioclip_jax.models.scan import STACKED_BLOCKS


def make_mesh(devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    # Auto axes: XLA inserts the collectives (e.g. for img @ txt.T over two batch-sharded operands); with jax >= 0.9's
    # default Explicit axes that contraction would be an error.
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], data_size: int, min_size: int = 2 ** 14) -> P:
    """Shard the largest dimension divisible by the data axis; small or indivisible arrays stay replicated."""
    if data_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % data_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "data"
            return P(*spec)
    return P()


def is_stacked_path(path) -> bool:
    """Whether a tree path leads into scanned blocks (leaves with a leading layer axis, models/scan.py)."""
    return any(getattr(key, "key", None) == STACKED_BLOCKS for key in path)


def tree_shardings(tree, mesh, fsdp: bool):
    """A sharding for every leaf of a (abstract) tree of params, or of a train state holding them. The layer axis of
    stacked blocks is never sharded: each layer is sharded as it would be on its own, so the scan slices one layer
    locally and `layer_gather` undoes it."""
    size = mesh.shape["data"]

    def leaf(path, x):
        shape = tuple(getattr(x, "shape", ()))
        if not fsdp:
            return NamedSharding(mesh, P())
        if is_stacked_path(path):
            return NamedSharding(mesh, P(None, *fsdp_spec(shape[1:], size)))
        return NamedSharding(mesh, fsdp_spec(shape, size))

    return jax.tree_util.tree_map_with_path(leaf, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(x, gathered: NamedSharding, sharded: NamedSharding):
    return jax.lax.with_sharding_constraint(x, gathered)


def _gather_fwd(x, gathered, sharded):
    return _gather(x, gathered, sharded), None


def _gather_bwd(gathered, sharded, _, cotangent):
    # The gradient goes back to where the param lives: a reduce-scatter, not an all-reduce of the whole layer.
    return (jax.lax.with_sharding_constraint(cotangent, sharded),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def layer_gather(mesh):
    """FSDP under scan (models' TowerOptions.gather_layer_params): one layer's params, sharded as `tree_shardings`
    shards a stacked layer, all-gathered where the layer runs; their gradients reduce-scattered back."""
    size, everywhere = mesh.shape["data"], replicated(mesh)
    return lambda params: jax.tree_util.tree_map(
        lambda x: _gather(x, everywhere, NamedSharding(mesh, fsdp_spec(tuple(x.shape), size))), params)


def gather_params(params, mesh, per_layer: bool):
    """Inside a jitted function: every param all-gathered where it is used (FSDP's forward), so activations stay
    batch-sharded; left to itself XLA splits the activations along the sharded param dimensions instead. With
    `per_layer` the scanned blocks are left sharded: the module gathers them one layer at a time (`layer_gather`),
    so the whole stack is never held gathered at once. Replicated params pass through unchanged."""
    everywhere = replicated(mesh)

    def gather(path, param):
        if per_layer and is_stacked_path(path):
            return param
        return jax.lax.with_sharding_constraint(param, everywhere)

    return jax.tree_util.tree_map_with_path(gather, params)
