"""The two layouts of a tower's residual blocks, and pure functions between them.

Per layer (open_clip's, the converter's and every saved file's):  transformer/resblocks_{i}/attn/in_proj/kernel [W, 3W]
Stacked (what a scanned `Transformer` holds):                      transformer/resblocks/attn/in_proj/kernel  [L, W, 3W]
Both functions work on any nested params dict (numpy, jax arrays or tracers), leave every other entry untouched, and
are exact inverses: stacking copies values, it never changes them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

STACKED_BLOCKS = "resblocks"  # the scanned block's name: one entry holding every layer
_LAYER = re.compile(r"^resblocks_(\d+)$")


def is_stacked(params: Mapping) -> bool:
    """Whether any tower of `params` holds its blocks stacked (a scanned model's params)."""
    return any(key == STACKED_BLOCKS or (isinstance(value, Mapping) and is_stacked(value))
               for key, value in params.items())


def stack_layers(params: Mapping) -> dict:
    """Per-layer params -> stacked params: every `resblocks_0 .. resblocks_{L-1}` group becomes one `resblocks` whose
    leaves carry a leading axis of length L. Params already stacked come back unchanged."""
    out: dict[str, Any] = {}
    layers = sorted((int(m.group(1)), key) for key in params if (m := _LAYER.match(key)))
    if layers:
        indices = [i for i, _ in layers]
        if indices != list(range(len(indices))):
            raise ValueError(f"cannot stack layers {indices}: expected resblocks_0 .. resblocks_{len(indices) - 1}")
        blocks = [params[key] for _, key in layers]
        structures = {jax.tree_util.tree_structure(b) for b in blocks}
        if len(structures) != 1:
            raise ValueError("cannot stack layers: resblocks_* do not all hold the same parameters")
        out[STACKED_BLOCKS] = jax.tree_util.tree_map(lambda *leaves: _stack(leaves), *blocks)
    for key, value in params.items():
        if _LAYER.match(key):
            continue
        out[key] = stack_layers(value) if isinstance(value, Mapping) else value
    return out


def unstack_layers(params: Mapping) -> dict:
    """Stacked params -> per-layer params (`resblocks` [L, ...] -> `resblocks_0 .. resblocks_{L-1}`). Params already
    per layer come back unchanged, so this is safe on either layout."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == STACKED_BLOCKS:
            length = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(value)}
            if len(length) != 1:
                raise ValueError(f"cannot unstack {STACKED_BLOCKS}: leading axes differ ({sorted(length)})")
            for i in range(length.pop()):
                out[f"resblocks_{i}"] = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], value)
        else:
            out[key] = unstack_layers(value) if isinstance(value, Mapping) else value
    return out


def _stack(leaves):
    # numpy in, numpy out (the converter and saved files stay on the host); jax arrays and tracers stack on device.
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)
