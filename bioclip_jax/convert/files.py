"""Reading and writing weights: open_clip files and folders, and bioclip_jax model folders.

open_clip folder (what `open_clip.create_model_and_transforms("local-dir:DIR")` and the HF hub read):
    open_clip_config.json          {"model_cfg": {...}, "preprocess_cfg": {...}}
    open_clip_model.safetensors    preferred
    open_clip_pytorch_model.bin    for tools that only take torch files
bioclip_jax model folder (flax layout, no torch anywhere):
    bioclip_jax_config.json        {"format": "bioclip_jax", "format_version": 1, "model_cfg": ..., "preprocess_cfg": ...}
    bioclip_jax_params.safetensors keys are flax paths joined by "/"
bioclip_jax training run (a trainer workdir): bioclip_jax_run.json + checkpoints/<step>/ (Orbax); the newest
finalized step's params are read.
Untrusted pickles are never executed: `.bin/.pt` go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.scan import unstack_layers

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_BIN = "open_clip_pytorch_model.bin"
NATIVE_CONFIG = "bioclip_jax_config.json"
NATIVE_PARAMS = "bioclip_jax_params.safetensors"
RUN_FILE = "bioclip_jax_run.json"
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
    """Reads any supported source: open_clip folder or file, bioclip_jax folder or params file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / RUN_FILE).exists():
            return _read_training_run(path)
        if (path / NATIVE_CONFIG).exists():
            return _read_native_folder(path)
        if (path / OPEN_CLIP_CONFIG).exists():
            return _read_open_clip_folder(path)
        raise ValueError(f"{path}: a folder without {OPEN_CLIP_CONFIG} or {NATIVE_CONFIG}; expected an open_clip "
                         "model folder (HF hub layout) or a bioclip_jax model folder")
    tensors = read_tensor_file(path)
    if any("/" in k for k in tensors):
        return Checkpoint(str(path), params=traverse_util.unflatten_dict(tensors, sep="/"))
    return Checkpoint(str(path), state_dict=tensors)


def read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """A flat {name: array} from `.safetensors` or a torch file, unwrapping {"state_dict": ...}."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch_file(path)
    raise ValueError(f"{path}: unsupported weights file; expected .safetensors or a torch file "
                     f"({', '.join(TORCH_SUFFIXES)}), or a model folder")


def _read_torch_file(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); .safetensors files do not") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean the same to the user
        raise ValueError(f"{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip training checkpoints (epoch_N.pt)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        out[key] = value.numpy()
    return out


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_open_clip_folder(folder: Path) -> Checkpoint:
    config = _read_json(folder / OPEN_CLIP_CONFIG)
    if "model_cfg" not in config:
        raise ValueError(f"{folder / OPEN_CLIP_CONFIG}: no 'model_cfg' entry")
    for name in (OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN):  # open_clip's own order of preference
        if (folder / name).exists():
            return Checkpoint(str(folder), config["model_cfg"], config.get("preprocess_cfg"),
                              state_dict=read_tensor_file(folder / name))
    raise FileNotFoundError(f"{folder}: has {OPEN_CLIP_CONFIG} but neither {OPEN_CLIP_SAFETENSORS} nor {OPEN_CLIP_BIN}")


def _read_native_folder(folder: Path) -> Checkpoint:
    config = _read_json(folder / NATIVE_CONFIG)
    version = config.get("format_version")
    if config.get("format") != "bioclip_jax" or version is None or version > FORMAT_VERSION:
        raise ValueError(f"{folder / NATIVE_CONFIG}: expected format 'bioclip_jax' with format_version <= "
                         f"{FORMAT_VERSION}, got {config.get('format')!r} version {version!r}")
    params_path = folder / NATIVE_PARAMS
    if not params_path.exists():
        raise FileNotFoundError(f"{folder}: missing {NATIVE_PARAMS}")
    params = traverse_util.unflatten_dict(read_tensor_file(params_path), sep="/")
    return Checkpoint(str(folder), config["model_cfg"], config.get("preprocess_cfg"), params=params)


def _read_training_run(workdir: Path) -> Checkpoint:
    import logging

    import jax
    import orbax.checkpoint as ocp

    workdir = workdir.resolve()  # Orbax resolves relative paths differently in places: give it absolute ones
    config = _read_json(workdir / RUN_FILE)
    steps = sorted((int(p.name) for p in (workdir / "checkpoints").glob("*")
                    if p.name.isdigit() and (p / "commit_success.txt").exists()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}: a training run without any finished checkpoint in checkpoints/")
    checkpointer = ocp.PyTreeCheckpointer()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about per-item metadata files it does not need here
    try:
        path = workdir / "checkpoints" / str(steps[0]) / "state"
        tree = checkpointer.metadata(path)
        tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, restore_args=args)
    finally:
        absl_logger.setLevel(level)
    # A run trained with scan_layers saved its blocks stacked; everything after loading speaks per-layer params. The
    # layout is read from the params themselves, not from the run file's config.scan_layers: the run file is
    # rewritten by each (re)start, so it can describe a different layout than an older checkpoint holds.
    return Checkpoint(f"{workdir} (step {steps[0]})", config["model_cfg"], config.get("preprocess_cfg"),
                      params=unstack_layers(state["params"]))


def write_open_clip_folder(folder: str | os.PathLike, state_dict: dict[str, np.ndarray], config: CLIPConfig,
                           preprocess_cfg: dict[str, Any], write_bin: bool = True) -> Path:
    """Writes an open_clip / HF-hub model folder. The .bin needs torch; without it only safetensors is written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": config.to_open_clip(), "preprocess_cfg": preprocess_cfg})
    _atomic(folder / OPEN_CLIP_SAFETENSORS, lambda tmp: save_file(state_dict, tmp))
    if write_bin:
        import torch

        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
        _atomic(folder / OPEN_CLIP_BIN, lambda tmp: torch.save(tensors, tmp))
    return folder


def write_native_folder(folder: str | os.PathLike, params: dict, config: CLIPConfig,
                        preprocess_cfg: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, order="C") for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    _atomic(folder / NATIVE_PARAMS, lambda tmp: save_file(flat, tmp))
    _write_json(folder / NATIVE_CONFIG, {"format": "bioclip_jax", "format_version": FORMAT_VERSION,
                                         "model_cfg": config.to_open_clip(), "preprocess_cfg": preprocess_cfg})
    return folder


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _atomic(path: Path, write) -> None:
    """Write to a temporary name, then rename: an interrupted export never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
