"""Training's shardings: the train state (params and optimizer state) replicated or FSDP-sharded over the mesh's
`data` axis. The mesh, batch and param shardings and the FSDP gathers are shared with inference (bioclip_jax/mesh.py);
they are re-exported here under their old names."""

from __future__ import annotations

from bioclip_jax.mesh import batch_sharding as batch_sharding
from bioclip_jax.mesh import fsdp_spec as fsdp_spec
from bioclip_jax.mesh import is_stacked_path as is_stacked_path
from bioclip_jax.mesh import layer_gather as layer_gather
from bioclip_jax.mesh import make_mesh as make_mesh
from bioclip_jax.mesh import replicated as replicated
from bioclip_jax.mesh import tree_shardings


def state_shardings(abstract_state, mesh, fsdp: bool):
    """A sharding for every leaf of a (abstract) train state: params and each optimizer moment sharded alike (the
    moments mirror the params' tree paths, stacked blocks included; step counters are small and stay replicated)."""
    return tree_shardings(abstract_state, mesh, fsdp)
