"""Device mesh and shardings: a `data` axis always; data parallel (params replicated) or FSDP (params and optimizer
state sharded over `data` along their largest divisible dimension)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


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


def state_shardings(abstract_state, mesh, fsdp: bool):
    """A sharding for every leaf of a (abstract) train state."""
    size = mesh.shape["data"]

    def leaf(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), size) if fsdp else P())

    return jax.tree_util.tree_map(leaf, abstract_state)
