"""A training run's folder, guarded: one trainer at a time, a new command checked against the run it would continue
before anything is written, and a metrics log that holds each step once.

What a run is, for this check: its architecture (the run file's `model_cfg`) and the structure of its train state
(every leaf's path, shape and dtype: params and optimizer state). Hyperparameters such as the learning rate or the
number of steps may change between commands; a different model or optimizer structure would make every checkpoint
unusable, so it is refused, or with `train.allow_restart` started in a new sub-folder, never over the old run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax
from etils import epath

from bioclip_jax import paths
from bioclip_jax.convert import run_dir
from bioclip_jax.errors import InputError


class WorkdirLock:
    """An exclusive lock on a local workdir, held by process 0 for the whole run; a second trainer on the same workdir
    stops with a message naming the holder. The kernel drops the lock when the holder dies, so nothing goes stale.
    URL workdirs (gs://) have no such lock: one launcher per run directory is the rule there (tools/launch_tpu.py)."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / run_dir.LOCK
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        if jax.process_index() != 0 or paths.is_url(self.path):
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise InputError(f"{self.path.parent} is in use by another training process ({holder}); wait for it to "
                             "finish or stop it, or train in another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def state_signature(abstract_state) -> dict[str, list]:
    """{"params/visual/conv1/kernel": [shape, dtype], ...} for every leaf of a train state."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): [list(leaf.shape), str(leaf.dtype)]
            for path, leaf in leaves}


def differences(run: dict, model_cfg: dict, signature: dict) -> list[str]:
    """What makes a new command's run another run than the one on disk (empty when it may resume)."""
    found = []
    old_cfg = run.get("model_cfg", {})
    for key in sorted(set(_flat(old_cfg)) | set(_flat(model_cfg))):
        old, new = _flat(old_cfg).get(key), _flat(model_cfg).get(key)
        if old != new:
            found.append(f"model {key}: {old!r} -> {new!r}")
    old_sig = run.get("state")
    if old_sig is not None:  # run files of older versions did not record it
        missing = [k for k in old_sig if k not in signature]
        added = [k for k in signature if k not in old_sig]
        changed = [f"{k} {old_sig[k]} -> {signature[k]}" for k in old_sig if k in signature and
                   old_sig[k] != signature[k]]
        for what, keys in (("state leaves only in the old run", missing), ("new state leaves", added),
                           ("changed state leaves", changed)):
            if keys:
                found.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
    return found


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def choose(workdir: epath.Path, model_cfg: dict, signature: dict, allow_restart: bool) -> epath.Path:
    """The folder this command trains in: `workdir` when it is new, holds no finished checkpoint, or holds the same
    run; else (with allow_restart) the first `restart-N` sub-folder holding this run, or a new one. Refuses a run
    that differs without allow_restart, naming the differences."""
    found = _mismatch(workdir, model_cfg, signature)
    if not found:
        return workdir
    if not allow_restart:
        raise InputError(f"{workdir} holds another run than this command describes: {'; '.join(found)}. Its "
                         "checkpoints cannot be resumed with this config; use another --workdir, or "
                         "--config.train.allow_restart=True to start this run in a new sub-folder of it")
    n = 1
    while True:
        sub = run_dir.restart_dir(workdir, n)
        if not _mismatch(sub, model_cfg, signature):
            return sub
        n += 1


def _mismatch(folder: epath.Path, model_cfg: dict, signature: dict) -> list[str]:
    if not run_dir.is_run(folder) or not run_dir.finished_steps(folder):
        return []  # nothing that could be lost
    return differences(run_dir.read_run_file(folder), model_cfg, signature)


def truncate_metrics(workdir: epath.Path, step: int) -> None:
    """Drops metrics.jsonl lines past `step` (the step a resumed run restarts from), so each step appears once."""
    path = workdir / run_dir.METRICS
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        paths.write_atomic(path, "".join(kept).encode())


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a killed run: drop it
