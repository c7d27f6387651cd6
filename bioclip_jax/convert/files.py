"""Reading and writing weights: open_clip files and folders, and bioclip_jax model folders.

open_clip folder (what `open_clip.create_model_and_transforms("local-dir:DIR")` and the HF hub read):
    open_clip_config.json          {"model_cfg": {...}, "preprocess_cfg": {...}}
    open_clip_model.safetensors    preferred
    open_clip_pytorch_model.bin    for tools that only take torch files
bioclip_jax model folder (flax layout, no torch anywhere):
    bioclip_jax_config.json        {"format": "bioclip_jax", "format_version": 1, "model_cfg": ...,
                                    "preprocess_cfg": ...}
    bioclip_jax_params.safetensors keys are flax paths joined by "/"
bioclip_jax training run (a trainer workdir): read by convert/run_dir.py, which owns that folder's layout.
Untrusted pickles are never executed: `.bin/.pt` go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from bioclip_jax import paths
from bioclip_jax.convert import transformers as hf
from bioclip_jax.errors import InputError, first_line
from bioclip_jax.models.config import CLIPConfig, config_from_json_dict, get_model_config

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_BIN = "open_clip_pytorch_model.bin"
NATIVE_CONFIG = "bioclip_jax_config.json"
NATIVE_PARAMS = "bioclip_jax_params.safetensors"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclasses.dataclass
class Checkpoint:
    """What a weights source holds. `state_dict` (open_clip keys) or `params` (flax tree) is set, not both."""

    source: str
    model_cfg: dict[str, Any] | None = None  # open_clip model_cfg, when the source carries one
    preprocess_cfg: dict[str, Any] | None = None
    state_dict: dict[str, np.ndarray] | None = None
    params: dict | None = None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a local or epath source: open_clip folder or file, bioclip_jax folder or params file, transformers CLIP
    folder (hub names and training runs are resolved by `checkpoint.read`). Its `source` is the path as given."""
    return dataclasses.replace(_read(paths.resolve(path)), source=os.fspath(path))


def _read(path: epath.Path) -> Checkpoint:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / NATIVE_CONFIG).exists():
            return _read_native_folder(path)
        if (path / OPEN_CLIP_CONFIG).exists():
            return _read_open_clip_folder(path)
        if (path / hf.CONFIG).exists():
            return _read_transformers_folder(path)
        raise InputError(f"{path}: a folder without {OPEN_CLIP_CONFIG}, {NATIVE_CONFIG} or {hf.CONFIG}; expected an "
                         "open_clip model folder (HF hub layout), a bioclip_jax model folder, a transformers CLIP "
                         "folder or a training run")
    tensors = read_tensor_file(path)
    if any("/" in k for k in tensors):
        return Checkpoint(str(path), params=traverse_util.unflatten_dict(tensors, sep="/"))
    if hf.is_transformers_state_dict(tensors):  # bare transformers CLIPModel weights: same tensors, other names
        tensors = hf.to_open_clip_state_dict(tensors, str(path))
    return Checkpoint(str(path), state_dict=tensors)


def read_tensor_file(path: epath.Path) -> dict[str, np.ndarray]:
    """A flat {name: array} from `.safetensors` or a torch file, unwrapping {"state_dict": ...}."""
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path.read_bytes())
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch_file(path)
    raise InputError(f"{path}: unsupported weights file; expected .safetensors or a torch file "
                     f"({', '.join(TORCH_SUFFIXES)}), or a model folder")


def _read_torch_file(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise InputError(f"reading {path} needs PyTorch (pip install torch); .safetensors files do not") from None
    try:
        obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean the same to the user
        raise InputError(f"{path}: not a loadable weights-only torch checkpoint ("
                         f"{first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip training checkpoints (epoch_N.pt)
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        out[key] = value.numpy()
    return out


def read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def load_model_config(name: str | os.PathLike) -> CLIPConfig:
    """Config for an open_clip model name or alias (`models.get_model_config`), or a path (local or gs://) to an
    open_clip model JSON (`model_configs/*.json`) or folder config (`{"model_cfg": ...}`)."""
    if not os.fspath(name).endswith(".json"):
        return get_model_config(os.fspath(name))
    return config_from_json_dict(read_json(paths.resolve(name)), os.fspath(name))


def _read_open_clip_folder(folder: epath.Path) -> Checkpoint:
    config = read_json(folder / OPEN_CLIP_CONFIG)
    if "model_cfg" not in config:
        raise InputError(f"{folder / OPEN_CLIP_CONFIG}: no 'model_cfg' entry")
    for name in (OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN):  # open_clip's own order of preference
        if (folder / name).exists():
            return Checkpoint(str(folder), config["model_cfg"], config.get("preprocess_cfg"),
                              state_dict=read_tensor_file(folder / name))
    raise FileNotFoundError(f"{folder}: has {OPEN_CLIP_CONFIG} but neither {OPEN_CLIP_SAFETENSORS} nor {OPEN_CLIP_BIN}")


def _read_transformers_folder(folder: epath.Path) -> Checkpoint:
    model_cfg = hf.model_cfg_from_config(read_json(folder / hf.CONFIG), str(folder / hf.CONFIG))
    preprocess_cfg = None
    if (folder / hf.PREPROCESSOR_CONFIG).exists():
        preprocess_cfg = hf.preprocess_cfg_from_config(read_json(folder / hf.PREPROCESSOR_CONFIG),
                                                       str(folder / hf.PREPROCESSOR_CONFIG))
    elif (folder / hf.PROCESSOR_CONFIG).exists():
        processor = read_json(folder / hf.PROCESSOR_CONFIG).get("image_processor")
        if processor is not None:
            preprocess_cfg = hf.preprocess_cfg_from_config(processor, str(folder / hf.PROCESSOR_CONFIG))
    for name in hf.WEIGHTS:
        if (folder / name).exists():
            state_dict = hf.to_open_clip_state_dict(read_tensor_file(folder / name), str(folder / name))
            return Checkpoint(str(folder), model_cfg, preprocess_cfg, state_dict=state_dict)
    raise FileNotFoundError(f"{folder}: has {hf.CONFIG} but neither {' nor '.join(hf.WEIGHTS)}")


def _read_native_folder(folder: epath.Path) -> Checkpoint:
    config = read_json(folder / NATIVE_CONFIG)
    version = config.get("format_version")
    if config.get("format") != "bioclip_jax" or version is None or version > FORMAT_VERSION:
        raise InputError(f"{folder / NATIVE_CONFIG}: expected format 'bioclip_jax' with format_version <= "
                         f"{FORMAT_VERSION}, got {config.get('format')!r} version {version!r}")
    params_path = folder / NATIVE_PARAMS
    if not params_path.exists():
        raise FileNotFoundError(f"{folder}: missing {NATIVE_PARAMS}")
    params = traverse_util.unflatten_dict(read_tensor_file(params_path), sep="/")
    return Checkpoint(str(folder), config["model_cfg"], config.get("preprocess_cfg"), params=params)


def write_open_clip_folder(folder: str | os.PathLike, state_dict: dict[str, np.ndarray], config: CLIPConfig,
                           preprocess_cfg: dict[str, Any], write_bin: bool = True) -> epath.Path:
    """Writes an open_clip / HF-hub model folder. The .bin needs torch; without it only safetensors is written."""
    folder = paths.resolve(folder)
    paths.make_dirs(folder)
    write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": config.to_open_clip(), "preprocess_cfg": preprocess_cfg})
    paths.write_atomic(folder / OPEN_CLIP_SAFETENSORS, save_safetensors(state_dict))
    if write_bin:
        import torch

        buffer = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buffer)
        paths.write_atomic(folder / OPEN_CLIP_BIN, buffer.getvalue())
    return folder


def write_native_folder(folder: str | os.PathLike, params: dict, config: CLIPConfig,
                        preprocess_cfg: dict[str, Any]) -> epath.Path:
    folder = paths.resolve(folder)
    paths.make_dirs(folder)
    flat = {k: np.asarray(v, order="C") for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    paths.write_atomic(folder / NATIVE_PARAMS, save_safetensors(flat))
    write_json(folder / NATIVE_CONFIG, {"format": "bioclip_jax", "format_version": FORMAT_VERSION,
                                         "model_cfg": config.to_open_clip(), "preprocess_cfg": preprocess_cfg})
    return folder


def write_json(path: epath.Path, obj: dict) -> None:
    paths.write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())
