"""A training run's folder, owned here: the name of everything in it, its Orbax checkpoints, and every way they are
read back (the trainer's full resume, `bioclip_jax.load(workdir)`'s params). Everything else asks this module.

    <workdir>/bioclip_jax_run.json          the run file: {"format": "bioclip_jax_run", "format_version",
                                            "model_cfg", "preprocess_cfg", "train_normalization", "config", "state"}
    <workdir>/checkpoints/<step>/state/     the train state {"step", "params", "opt_state"}
    <workdir>/checkpoints/<step>/data/      the Grain iterator's position after that step
    <workdir>/checkpoints/<step>.unreadable a damaged step the trainer moved aside (kept for inspection)
    <workdir>/metrics.jsonl, tensorboard/   the metric logs
    <workdir>/.lock                         held by the trainer while it runs
    <workdir>/restart-<N>/                  another run started in this folder (train.allow_restart)

One Orbax API writes and reads: a CheckpointManager with `args.Composite` over a "state" item (PyTree handler) and a
"data" item (Grain's handler). The shape follows MaxText's checkpointing.py: one place creates the manager, saves,
restores onto target shardings, and restores params alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import numpy as np
from etils import epath

from bioclip_jax import paths
from bioclip_jax.convert.files import FORMAT_VERSION, Checkpoint, read_json, write_json
from bioclip_jax.errors import InputError, first_line
from bioclip_jax.models.clip import without_continual_proj
from bioclip_jax.models.scan import unstack_layers

log = logging.getLogger(__name__)

RUN_FILE = "bioclip_jax_run.json"
CHECKPOINTS = "checkpoints"
STATE = "state"
DATA = "data"
UNREADABLE = ".unreadable"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
RESTART_PREFIX = "restart-"


def is_run(path: str | os.PathLike) -> bool:
    return (paths.resolve(path) / RUN_FILE).exists()


def restart_dir(workdir: epath.Path, n: int) -> epath.Path:
    return workdir / f"{RESTART_PREFIX}{n}"


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
    """Finalized checkpoint steps, newest first ([] when there are none, or no checkpoints folder)."""
    with Checkpoints(workdir, read_only=True) as checkpoints:
        return checkpoints.steps()


def read(workdir: str | os.PathLike) -> Checkpoint:
    """The newest readable finished checkpoint's params as host numpy arrays, per layer (a run trained with
    scan_layers saved its blocks stacked). An unreadable newest step is skipped with one warning, as the trainer
    skips it when it resumes; nothing is moved here (a reader may not own the folder)."""
    workdir = paths.resolve(workdir)
    run = read_run_file(workdir)
    with Checkpoints(workdir, read_only=True) as checkpoints:
        steps = checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}: a training run without any finished checkpoint in {CHECKPOINTS}/")
        for step in steps:
            try:
                params = checkpoints.restore_params(step)
            except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one", as the trainer
                log.warning("%s: checkpoint step %d is unreadable (%s); using the previous one", workdir, step,
                            first_line(e))
                continue
            return Checkpoint(f"{workdir} (step {step})", run["model_cfg"], run.get("preprocess_cfg"),
                              params=without_continual_proj(unstack_layers(params)))
    raise InputError(f"{workdir}: none of its checkpoints (steps {', '.join(map(str, steps))}) is readable")


class Checkpoints:
    """The run's Orbax CheckpointManager. Use it as a context manager: closing waits for an asynchronous save and
    stops Orbax's threads. `read_only` opens an existing folder without creating anything (for readers)."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, every_steps: int = 1000, async_save: bool = True,
                 read_only: bool = False):
        import grain
        import orbax.checkpoint as ocp

        self.directory = paths.resolve(workdir) / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                               enable_async_checkpointing=async_save and not read_only,
                                               create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            STATE: ocp.PyTreeCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()})

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - an async save failing again must not hide the error that is leaving
            if exc_type is None:
                raise
            log.debug("closing %s after an error", self.directory, exc_info=True)

    def close(self) -> None:
        self.manager.close()

    def steps(self) -> list[int]:
        """Finalized steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Saves the state and the iterator's position as one step (asynchronously unless async_save=False) if the
        interval says so or `force`; returns whether a save started."""
        import grain
        import orbax.checkpoint as ocp

        return self.manager.save(step, force=force, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(state), DATA: grain.checkpoint.CheckpointSave(data_iterator)}))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, data_iterator) -> tuple[int | None, Any]:
        """(step, state) of the newest readable step, with the iterator restored in place; (None, None) if none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct carrying the target shardings (another mesh reshards).
        The caller has checked that the run's structure matches it, so a failure here means the step's files are
        damaged: such a step is moved aside (kept as `<step>.unreadable`) so that the rerun can save it again."""
        import grain
        import orbax.checkpoint as ocp

        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        for step in self.steps():
            args = ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                DATA: grain.checkpoint.CheckpointRestore(data_iterator)})
            try:
                with _draining_event_loops():
                    return step, self.manager.restore(step, args=args)[STATE]
            except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one"
                kept = self._move_aside(step)
                log.warning("checkpoint step %d in %s is unreadable (%s); kept as %s, resuming from the one before",
                            step, self.directory, first_line(e), kept.name)
        return None, None

    def restore_params(self, step: int) -> dict:
        """The params of `step` as host numpy arrays, in the layout they were saved in: a partial restore of the
        state item, so the optimizer state (twice the params) is never read."""
        import jax
        import orbax.checkpoint as ocp

        with _draining_event_loops():  # reading the metadata fails the same way on damaged arrays
            tree = self.manager.item_metadata(step)[STATE]
            params = getattr(tree, "tree", tree)["params"]
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
            args = ocp.args.PyTreeRestore(item={"params": params}, restore_args={"params": restore_args},
                                          partial_restore=True)
            return self.manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"]

    def _move_aside(self, step: int) -> epath.Path:
        """Renames checkpoints/<step> to <step>.unreadable[-N] (Orbax ignores names that are not steps)."""
        import jax
        from jax.experimental import multihost_utils

        target = self.directory / f"{step}{UNREADABLE}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{UNREADABLE}-{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        multihost_utils.sync_global_devices(f"bioclip_jax: moved checkpoint {step} aside")
        self.manager.reload()
        return target


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that finishes its pending tasks when asked to close, and stays open for what comes later.

    Orbax runs each restore on a fresh event loop and closes it as soon as the first read fails, while the reads of
    the other arrays are still in flight in tensorstore; each of those then completes into the closed loop from a
    tensorstore thread and prints a "RuntimeError: Event loop is closed" traceback (one per array) after the
    fallback's warning. Those completions are not tasks of the loop, so draining cannot wait for them: the loop is
    left open (they land in a queue nobody runs) and its selector is freed with it, after the last of them."""

    def close(self) -> None:
        pending = [t for t in asyncio.all_tasks(self) if not t.done()]
        if pending and not self.is_running() and not self.is_closed():
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def _draining_event_loops():
    """Event loops created inside (Orbax's, for one restore) finish their tasks and never close under late reads."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)

