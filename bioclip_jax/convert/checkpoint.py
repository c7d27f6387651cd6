"""Whole conversions: open_clip <-> bioclip_jax folders, and exporting a loaded or trained model."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from bioclip_jax.convert import files
from bioclip_jax.convert.state_dict import to_open_clip
from bioclip_jax.inference.model import Model, from_checkpoint


def _host_params(model: Model) -> dict:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), model.params)


def export_open_clip(model: Model, folder: str | os.PathLike, write_bin: bool | None = None) -> Path:
    """Writes an open_clip folder (config, safetensors and, when torch is importable, the .bin)."""
    if write_bin is None:
        write_bin = _torch_available()
    state_dict = to_open_clip(_host_params(model), model.config)
    return files.write_open_clip_folder(folder, state_dict, model.config, model.preprocess.to_open_clip(), write_bin)


def save_model(model: Model, folder: str | os.PathLike) -> Path:
    """Writes a bioclip_jax model folder (flax layout, safetensors)."""
    return files.write_native_folder(folder, _host_params(model), model.config, model.preprocess.to_open_clip())


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model: str | None = None,
                       write_bin: bool | None = None) -> tuple[str, Path]:
    """Converts in the direction SRC's format implies: open_clip -> bioclip_jax folder, bioclip_jax -> open_clip
    folder. Returns (the format written, the folder)."""
    ckpt = files.read_checkpoint(src)
    loaded = from_checkpoint(ckpt, model=model)
    if ckpt.state_dict is not None:  # open_clip keys
        return "bioclip_jax", save_model(loaded, dst)
    return "open_clip", export_open_clip(loaded, dst, write_bin)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
