"""Orbax checkpoints holding the train state and the Grain iterator state in the same step (exact resume).

A corrupt or partial latest checkpoint is skipped, with a warning, in favour of the one before it; restoring onto
another mesh reshards (the abstract target carries the new shardings)."""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bioclip_jax import paths
from bioclip_jax.convert.run_file import first_line

log = logging.getLogger(__name__)


def make_manager(directory: str | os.PathLike, max_to_keep: int = 3, save_interval_steps: int = 1000,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(paths.resolve(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval says so or `force`; returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    return manager.save(step, args=args, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
    """(step, state) of the newest readable checkpoint, with the iterator restored in place; (None, None) if none.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings; the caller has checked that the
    run's structure matches it (workdir.choose), so a failure here means the step's files are damaged. Such a step is
    moved aside (kept, as `<step>.unreadable`) so that the rerun can save that step again."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one"
            kept = _move_aside(manager, step)
            log.warning("checkpoint step %d in %s is unreadable (%s); kept as %s, resuming from the one before", step,
                        manager.directory, first_line(e), kept.name)
            continue
        return step, restored["state"]
    return None, None


def _move_aside(manager: ocp.CheckpointManager, step: int):
    """Renames checkpoints/<step> to <step>.unreadable[-N] (Orbax ignores names that are not steps)."""
    directory = paths.resolve(manager.directory)
    target = directory / f"{step}.unreadable"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{step}.unreadable-{n}"
    if jax.process_index() == 0:
        (directory / str(step)).rename(target)
    multihost_utils.sync_global_devices(f"bioclip_jax: moved checkpoint {step} aside")
    manager.reload()
    return target


def abstract_like(state, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
