"""Whole conversions: open_clip <-> bioclip_jax folders (and to transformers CLIP folders), and exporting a loaded
or trained model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from bioclip_jax.convert import files
from bioclip_jax.convert import transformers as hf
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


def export_transformers(model: Model, folder: str | os.PathLike) -> Path:
    """Writes a transformers CLIPModel folder (config, safetensors, tokenizer and image processor files)."""
    plain = dataclasses.replace(model.config, custom_text=False)  # transformers has one layout for both
    state_dict = to_open_clip(_host_params(model), plain)
    return hf.write_transformers_folder(folder, state_dict, model.config, model.preprocess.to_open_clip())


def save_model(model: Model, folder: str | os.PathLike) -> Path:
    """Writes a bioclip_jax model folder (flax layout, safetensors)."""
    return files.write_native_folder(folder, _host_params(model), model.config, model.preprocess.to_open_clip())


FORMATS = ("bioclip_jax", "open_clip", "transformers")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model: str | None = None,
                       write_bin: bool | None = None, to: str | None = None) -> tuple[str, Path]:
    """Writes SRC's weights in format `to`; by default in the direction SRC's format implies: open_clip (or
    transformers) -> bioclip_jax folder, bioclip_jax -> open_clip folder. Returns (the format written, the folder)."""
    if to is not None and to not in FORMATS:
        raise ValueError(f"to={to!r}: expected one of {', '.join(FORMATS)}")
    ckpt = files.read_checkpoint(src)
    loaded = from_checkpoint(ckpt, model=model)
    if to is None:
        to = "bioclip_jax" if ckpt.state_dict is not None else "open_clip"  # state_dict: open_clip keys
    if to == "bioclip_jax":
        return to, save_model(loaded, dst)
    if to == "transformers":
        return to, export_transformers(loaded, dst)
    return to, export_open_clip(loaded, dst, write_bin)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
