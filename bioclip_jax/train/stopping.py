"""Stopping a run without losing it: SIGTERM (preemption, scancel, kill) and SIGINT (Ctrl-C) make the loop save the
current step and return, on every host at the same step.

One process: Python handlers for both signals set a flag the loop reads after each step.
Several processes (jax.distributed): JAX's preemption notifier owns SIGTERM and its sync point, read every step
through Orbax's `reached_preemption(step)`, tells every host the same step to stop at without a host sync per step;
Ctrl-C on one host is turned into a SIGTERM to itself so that it takes the same path.

Exit codes of `bioclip-jax train` (as shells report a process killed by the signal): 143 after SIGTERM, 130 after
SIGINT; rerunning the same command resumes.
"""

from __future__ import annotations

import os
import signal

import jax

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


class StopSignals:
    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        multihost = jax.process_count() > 1
        handlers = {signal.SIGINT: self._forward_to_sigterm if multihost else self._record}
        if not multihost:
            handlers[signal.SIGTERM] = self._record
        for signum, handler in handlers.items():
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: Orbax's preemption check still applies
                pass
        return self

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def _forward_to_sigterm(self, signum, frame) -> None:
        self.received = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, checkpoints, step: int) -> bool:
        """After `step`: stop here? True on every host at the same step."""
        if jax.process_count() == 1:
            return self.received is not None or checkpoints.reached_preemption(step)
        if checkpoints.reached_preemption(step):
            self.received = self.received or "SIGTERM"
            return True
        return False

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
