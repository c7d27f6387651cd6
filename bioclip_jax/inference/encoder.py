"""The sharded encoder: a model's params on the device mesh (replicated, or FSDP-sharded as training keeps them) and
jitted image and text encoders that split every batch over all devices of all hosts.

Evaluators, embed and predict receive an encoder, as big_vision's evaluators receive a `predict_fn`. A single-device
`Model` has the same surface (`Encoder`: config, preprocess, logit_scale, encode_pixels, encode_tokens), so code
written against it runs on a laptop's one device and on every chip of a slice alike.

Rows in, rows out, as numpy: `encode_pixels` takes this process's images and returns this process's features (each
host embeds its own share; in a multi-process run every process calls it with the same number of rows, a collective);
`encode_tokens` takes texts that are the same on every process (class names, captions of gathered labels) and
returns all their features on every process, each device having embedded a slice of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax import mesh as mesh_lib
from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.inference.model import Model
from bioclip_jax.models.clip import CLIP
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.scan import is_stacked


class Encoder(Protocol):
    """What evaluators and inference use of a model: a `Model` (one device) or a `MeshEncoder` (the mesh)."""

    config: CLIPConfig
    preprocess: Preprocess

    @property
    def logit_scale(self) -> float: ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray: ...


def encode_fn(module: CLIP, mesh, method: str, out_sharding):
    """jit((params, inputs) -> unnormalised features): params where they live on `mesh` (replicated or FSDP, per-layer
    or stacked for a module with scan_layers), inputs batch-sharded. FSDP params are gathered where used, as in the
    training step, so activations stay batch-sharded; a scanned module gathers its blocks one layer at a time."""
    per_layer = module.gather_layer_params is not None

    def fn(params, inputs):
        params = mesh_lib.gather_params(params, mesh, per_layer)
        return module.apply({"params": params}, inputs, method=method)

    return jax.jit(fn, out_shardings=out_sharding)


def encoder_module(config: CLIPConfig, mesh, scan_layers: bool, dtype: Any = jnp.float32,
                   attn_implementation: str | None = "xla") -> CLIP:
    """The CLIP module for params laid out per layer or stacked (`scan_layers`); stacked blocks are gathered one
    layer at a time inside the loop (a no-op for replicated params)."""
    return CLIP(config, dtype=dtype, attn_implementation=attn_implementation, scan_layers=scan_layers,
                gather_layer_params=mesh_lib.layer_gather(mesh) if scan_layers else None)


@dataclasses.dataclass(eq=False)
class MeshEncoder:
    """A model's params on `mesh` and its image and text encoders there. `params` may be swapped for others of the
    same layout and shardings (the trainer hands in each evaluation's train-state params) without recompiling."""

    config: CLIPConfig
    params: Any  # jax.Arrays on `mesh`: per-layer or stacked blocks (models/scan.py), replicated or FSDP-sharded
    preprocess: Preprocess
    mesh: jax.sharding.Mesh
    dtype: Any = jnp.float32
    attn_implementation: str | None = "xla"

    @functools.cached_property
    def module(self) -> CLIP:
        return encoder_module(self.config, self.mesh, is_stacked(self.params), self.dtype, self.attn_implementation)

    @functools.cached_property
    def _fns(self) -> dict:
        return {}  # (method, per_process) -> its jitted function, compiled once per input shape

    def _fn(self, method: str, per_process: bool):
        if (method, per_process) not in self._fns:
            out = mesh_lib.batch_sharding(self.mesh) if per_process else mesh_lib.replicated(self.mesh)
            self._fns[method, per_process] = encode_fn(self.module, self.mesh, method, out)
        return self._fns[method, per_process]

    @property
    def logit_scale(self) -> float:
        scale = self.params["logit_scale"]
        return float(np.exp(np.asarray(scale.addressable_data(0) if isinstance(scale, jax.Array) else scale)))

    def encode_pixels(self, pixels: np.ndarray, per_process: bool = True) -> np.ndarray:
        """Preprocessed images [B, H, W, 3] -> unnormalised features [B, D]: this process's rows (per_process), or
        rows that are the same on every process."""
        return self._run("encode_image", pixels, per_process)

    def encode_tokens(self, tokens: np.ndarray, per_process: bool = False) -> np.ndarray:
        """Token ids [B, L] -> unnormalised features [B, D]: by default the same texts on every process (each device
        embeds a slice, every process gets them all); `per_process` for each process's own texts."""
        return self._run("encode_text", tokens, per_process)

    def _run(self, method: str, inputs: np.ndarray, per_process: bool) -> np.ndarray:
        inputs = np.asarray(inputs)
        n = len(inputs)
        if n == 0:
            return np.zeros((0, self.config.embed_dim), np.float32)
        # Rows pad to a multiple of the devices that hold them: each device gets an equal slice.
        devices = len(self.mesh.local_devices) if per_process else self.mesh.devices.size
        rows = -(-n // devices) * devices
        if rows > n:
            inputs = np.concatenate([inputs, np.zeros((rows - n, *inputs.shape[1:]), inputs.dtype)])
        sharding = mesh_lib.batch_sharding(self.mesh)
        if per_process:
            batch = jax.make_array_from_process_local_data(sharding, inputs)
        else:
            batch = jax.make_array_from_callback(inputs.shape, sharding, lambda index: inputs[index])
        out = self._fn(method, per_process)(self.params, batch)
        if not per_process:
            return np.asarray(out.addressable_data(0))[:n]
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])[:n]


def place_params(params, mesh, fsdp: bool = False):
    """Host (or one device's) params -> jax.Arrays on `mesh`, replicated or FSDP-sharded (mesh.tree_shardings). Every
    process passes the same params; each keeps only its devices' pieces."""
    def place(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, params, mesh_lib.tree_shardings(params, mesh, fsdp))


def mesh_encoder(model: Model, mesh: jax.sharding.Mesh | None = None, fsdp: bool = False) -> MeshEncoder:
    """`model` on `mesh` (default: every device of every host): its params replicated, or with `fsdp` sharded over
    the devices (for a model too large for one device's memory with its activations). Jobs whose hosts do unequal
    work (embed's parts: host i runs parts i, i+n, ...) pass `mesh=mesh.make_mesh(jax.local_devices())`: each host
    then encodes on its own chips with no collective between hosts, so none waits for another's call."""
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    return MeshEncoder(model.config, place_params(model.params, mesh, fsdp), model.preprocess, mesh, model.dtype,
                       model.attn_implementation)
