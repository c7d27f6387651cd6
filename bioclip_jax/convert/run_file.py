"""A training run's folder as a weights source: the run file (what rebuilds the model) and the Orbax checkpoints.

    <workdir>/bioclip_jax_run.json   {"format": "bioclip_jax_run", "format_version", "model_cfg", "preprocess_cfg",
                                      "config": the training config}
    <workdir>/checkpoints/<step>/    Orbax steps; finalized ones carry commit_success.txt
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from etils import epath

from bioclip_jax import paths
from bioclip_jax.convert.files import FORMAT_VERSION, RUN_FILE, Checkpoint, read_json, write_json
from bioclip_jax.errors import InputError
from bioclip_jax.models.scan import unstack_layers

log = logging.getLogger(__name__)


def is_training_run(path: str | os.PathLike) -> bool:
    return (paths.resolve(path) / RUN_FILE).exists()


def write_run_file(workdir: str | os.PathLike, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                   config: dict[str, Any], state: dict[str, list] | None = None,
                   train_normalization: dict[str, Any] | None = None) -> epath.Path:
    """What `bioclip_jax.load(workdir)` needs to rebuild the model (`preprocess_cfg`: the evaluation and export
    preprocessing), the config that trained it, the pixel statistics it was trained with (which may differ), and the
    structure of its train state (leaf path -> [shape, dtype]), which a later command must match to resume it."""
    path = paths.resolve(workdir) / RUN_FILE
    write_json(path, {"format": "bioclip_jax_run", "format_version": FORMAT_VERSION, "model_cfg": model_cfg,
                      "preprocess_cfg": preprocess_cfg, "train_normalization": train_normalization,
                      "config": config, "state": state})
    return path


def read_run_file(workdir: str | os.PathLike) -> dict[str, Any]:
    path = paths.resolve(workdir) / RUN_FILE
    run = read_json(path)
    if run.get("format") != "bioclip_jax_run" or run.get("format_version", FORMAT_VERSION + 1) > FORMAT_VERSION:
        raise InputError(f"{path}: expected format 'bioclip_jax_run' with format_version <= {FORMAT_VERSION}, got "
                         f"{run.get('format')!r} version {run.get('format_version')!r}")
    return run


def finished_steps(workdir: str | os.PathLike) -> list[int]:
    """Finalized checkpoint steps, newest first."""
    directory = paths.resolve(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted((int(p.name) for p in directory.iterdir()
                   if p.name.isdigit() and (p / "commit_success.txt").exists()), reverse=True)


def read_training_run(workdir: str | os.PathLike) -> Checkpoint:
    """The newest readable finished checkpoint's params as host numpy arrays. An unreadable newest step is skipped
    with one warning, as the trainer skips it when it resumes."""
    workdir = paths.resolve(workdir)
    run = read_run_file(workdir)
    steps = finished_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: a training run without any finished checkpoint in checkpoints/")
    for step in steps:
        try:
            params = _read_params(workdir / "checkpoints" / str(step) / "state")
        except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one", as the trainer
            log.warning("%s: checkpoint step %d is unreadable (%s); using the previous one", workdir, step,
                        first_line(e))
            continue
        return Checkpoint(f"{workdir} (step {step})", run["model_cfg"], run.get("preprocess_cfg"), params=params)
    raise InputError(f"{workdir}: none of its checkpoints (steps {', '.join(map(str, steps))}) is readable")


def _read_params(path: epath.Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)  # Orbax logs per-item metadata warnings and its own failures at length
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.metadata(path)
            tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
            args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            # A run trained with scan_layers saved its blocks stacked; everything after loading speaks per-layer
            # params. The layout is read from the params themselves, not from the run's config.
            return unstack_layers(checkpointer.restore(path, restore_args=args)["params"])
    finally:
        absl_logger.setLevel(level)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
