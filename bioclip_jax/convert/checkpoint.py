"""Checkpoint resolution and whole conversions: any weights source (a file, a folder, a training run, a Hugging Face
hub name) -> (architecture, params, preprocessing), and writing those as an open_clip, bioclip_jax or transformers
folder.

The exporters take anything with `config`, `params` and `preprocess` (a `bioclip_jax.Model`, a training result).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from bioclip_jax import paths
from bioclip_jax.convert import files, hub, run_dir
from bioclip_jax.convert import state_dict as sd
from bioclip_jax.convert import transformers as hf
from bioclip_jax.data.transforms import Preprocess
from bioclip_jax.errors import InputError
from bioclip_jax.models.config import CLIPConfig


@dataclasses.dataclass
class Resolved:
    """A weights source made concrete: flax params (host numpy) that fit `config`."""

    config: CLIPConfig
    params: dict
    preprocess_cfg: dict[str, Any] | None
    source: str


def read(path: str | os.PathLike) -> files.Checkpoint:
    """Any supported source: open_clip folder or file, bioclip_jax folder or params file, transformers CLIP folder,
    a training run, or a Hugging Face hub name (hf-hub:ORG/NAME, bioclip, bioclip-2; a local path of that name wins)."""
    repo_id = hub.hub_repo_id(path)
    if repo_id is not None:
        return dataclasses.replace(files.read_checkpoint(hub.download_model(repo_id)),
                                   source=f"{hub.HUB_PREFIX}{repo_id}")
    if not paths.is_url(path) and not os.path.exists(path):  # a mistyped model name reads as a missing path
        close = difflib.get_close_matches(os.fspath(path), list(hub.ALIASES), n=1)
        raise FileNotFoundError(f"{os.path.abspath(path)}: no such file or folder, and not a model name "
                                f"({', '.join(hub.ALIASES)} or {hub.HUB_PREFIX}ORG/NAME)"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        if run_dir.is_run(path):
            return run_dir.read(path)
        return files.read_checkpoint(path)
    except ImportError as e:  # a remote file system whose package is missing (epath's backends are optional)
        raise InputError(f"{path}: {e} ({paths.GCS_HINT})") from None


def resolve(ckpt: files.Checkpoint, model: str | None = None) -> Resolved:
    """The architecture (the source's own config, else `model`) and params checked against it.

    `model` names the architecture when the weights carry no config: GELU and QuickGELU models have identical
    tensors, so it cannot be guessed. A source's own config must agree with `model` if both are given."""
    try:  # the config's errors name a key; the source names the file it came from
        config = _resolve_config(ckpt, model)
        Preprocess.from_open_clip(ckpt.preprocess_cfg, config.vision.image_size)  # checked before any image
    except InputError as e:
        raise InputError(e if str(e).startswith(ckpt.source) else f"{ckpt.source}: {e}") from None
    if ckpt.params is not None:
        _check_params(ckpt.params, config, ckpt.source)
        params = ckpt.params
    else:
        try:
            params = sd.from_open_clip(ckpt.state_dict, config)
        except sd.StateDictMismatch as e:
            raise sd.StateDictMismatch(f"{ckpt.source}: {e}") from None
    return Resolved(config, params, ckpt.preprocess_cfg, ckpt.source)


def _resolve_config(ckpt: files.Checkpoint, model: str | None) -> CLIPConfig:
    if ckpt.model_cfg is not None:
        config = CLIPConfig.from_open_clip(ckpt.model_cfg, name=model or "")
        expected = files.load_model_config(model).to_open_clip() if model is not None else None
        if expected is not None and expected != config.to_open_clip():
            raise InputError(f"{ckpt.source}: its config {config.to_open_clip()} does not match model={model!r} "
                             f"({expected}); drop `model` to use the folder's config")
        return config
    if model is None:
        fits = sd.fitting_architectures(ckpt.state_dict) if ckpt.state_dict is not None else []
        hint = f" (these weights fit: {', '.join(fits)})" if fits else ""
        raise InputError(f"{ckpt.source}: these weights carry no model config; pass the architecture, e.g. "
                         f"model='ViT-B-16-quickgelu' for BioCLIP{hint}. GELU and QuickGELU models have the same "
                         "tensors, so it cannot be inferred.")
    return files.load_model_config(model)


def _check_params(params: dict, config: CLIPConfig, source: str) -> None:
    expected = sd.param_shapes(config)
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
    problems = {"missing keys": [f"{'/'.join(p)} {s}" for p, s in expected.items() if p not in got],
                "unexpected keys": ['/'.join(p) for p in got if p not in expected],
                "wrong shapes": [f"{'/'.join(p)}: got {got[p]}, expected {s}" for p, s in expected.items()
                                 if p in got and got[p] != s]}
    if any(problems.values()):
        raise sd.StateDictMismatch.listing(f"{source}: params do not match the config", problems)


def host_params(params) -> dict:
    """The params as host numpy arrays on every process, also when FSDP spreads them over hosts (device_get would
    fail on arrays that are not fully addressable here)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)


def export_open_clip(model, folder: str | os.PathLike, write_bin: bool | None = None) -> epath.Path:
    """Writes an open_clip folder (config, safetensors and, when torch is importable, the .bin)."""
    if write_bin is None:
        write_bin = _torch_available()
    state_dict = sd.to_open_clip(host_params(model.params), model.config)
    return files.write_open_clip_folder(folder, state_dict, model.config, model.preprocess.to_open_clip(), write_bin)


def export_transformers(model, folder: str | os.PathLike) -> epath.Path:
    """Writes a transformers CLIPModel folder (config, safetensors, tokenizer and image processor files)."""
    plain = dataclasses.replace(model.config, custom_text=False)  # transformers has one layout for both
    state_dict = sd.to_open_clip(host_params(model.params), plain)
    return hf.write_transformers_folder(folder, state_dict, model.config, model.preprocess.to_open_clip())


def save_model(model, folder: str | os.PathLike) -> epath.Path:
    """Writes a bioclip_jax model folder (flax layout, safetensors)."""
    return files.write_native_folder(folder, host_params(model.params), model.config, model.preprocess.to_open_clip())


FORMATS = ("bioclip_jax", "open_clip", "transformers")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model: str | None = None,
                       write_bin: bool | None = None, to: str | None = None) -> tuple[str, epath.Path]:
    """Writes SRC's weights in format `to`; by default in the direction SRC's format implies: open_clip (or
    transformers) -> bioclip_jax folder, bioclip_jax -> open_clip folder. Returns (the format written, the folder)."""
    if to is not None and to not in FORMATS:
        raise InputError(f"to={to!r}: expected one of {', '.join(FORMATS)}")
    paths.check_reachable(dst)  # before reading the source: a missing bucket is named in seconds, not after it
    ckpt = read(src)
    resolved = resolve(ckpt, model=model)
    weights = types.SimpleNamespace(  # what the exporters read of a Model
        config=resolved.config, params=resolved.params,
        preprocess=Preprocess.from_open_clip(resolved.preprocess_cfg, resolved.config.vision.image_size))
    if to is None:
        to = "bioclip_jax" if ckpt.state_dict is not None else "open_clip"  # state_dict: open_clip keys
    if to == "bioclip_jax":
        return to, save_model(weights, dst)
    if to == "transformers":
        return to, export_transformers(weights, dst)
    return to, export_open_clip(weights, dst, write_bin)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
