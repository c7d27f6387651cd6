"""Host batches onto the devices: per-process numpy arrays -> global jax.Arrays, and uint8 pixels -> normalised floats
inside the jitted step (the input pipeline ships uint8, 4x less to move than float32)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax.data.transforms import NORMALIZATION


def to_global(batch: dict, sharding: jax.sharding.Sharding, keys: Sequence[str] = ("image", "tokens")) -> dict:
    """This process's numeric arrays -> global jax.Arrays sharded along the batch
    (`make_array_from_process_local_data`)."""
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys if k in batch}


def normalize_images(images: jax.Array, normalization: str = "openai", dtype=jnp.float32) -> jax.Array:
    """uint8 [..., 3] -> normalised float, on the device (inside the jitted step)."""
    mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATION[normalization])
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def interleave_replay(batch: dict, shards: int, keys: Sequence[str] = ("image", "tokens")) -> dict:
    """A host batch of main rows then `batch["replay_rows"]` replay rows -> `shards` equal blocks (this process's
    devices along the batch, in order), each its share of the main rows then its share of the replay rows: the
    layout `models.loss.split_replay_rows` reads on every device, whatever the number of processes."""
    replay = batch["replay_rows"]
    out = dict(batch)
    for k in keys:
        x = batch[k]
        main, extra = x[:len(x) - replay], x[len(x) - replay:]
        blocks = [main.reshape(shards, -1, *x.shape[1:]), extra.reshape(shards, -1, *x.shape[1:])]
        out[k] = np.concatenate(blocks, axis=1).reshape(x.shape)
    return out
