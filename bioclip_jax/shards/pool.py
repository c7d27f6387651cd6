"""Worker processes for make-shards: `map_ordered` runs jobs in a pool (or inline), and every job reports the samples
it has processed through the `Progress` it is handed, so one bar follows all workers."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time

_SEND_EVERY = 0.2  # seconds between a worker's progress messages: the bar stays live without a message per sample


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Progress:
    """Counts processed samples: straight onto a tqdm bar inline, through a queue to the parent from pool workers
    (batched). Callable: progress(n)."""

    def __init__(self, bar=None, channel=None):
        self._bar, self._channel = bar, channel
        self._pending, self._sent = 0, time.monotonic()

    def __call__(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
        elif self._channel is not None:
            self._pending += n
            if time.monotonic() - self._sent >= _SEND_EVERY:
                self.flush()

    def flush(self) -> None:
        if self._channel is not None and self._pending:
            self._channel.put(self._pending)
            self._pending, self._sent = 0, time.monotonic()

    def __getstate__(self) -> dict:  # a worker's copy: the queue travels, the parent's bar does not
        return {"_bar": None, "_channel": self._channel, "_pending": 0, "_sent": 0.0}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool


def _run(job):
    i, fn, payload, progress = job
    try:
        return i, fn(payload, progress)
    finally:
        progress.flush()


def _context():
    # forkserver: workers neither inherit a parent's JAX threads (fork) nor re-import everything each (spawn).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bioclip_jax.shards.make"])  # imported once in the server, not per worker
        return ctx
    return multiprocessing.get_context("spawn")


def map_ordered(fn, payloads: list, workers: int, bar=None) -> list:
    """[fn(p, progress) for p in payloads] in a pool (inline for one worker or one payload); `bar` follows what the
    jobs count on their `progress`."""
    if workers <= 1 or len(payloads) <= 1:
        progress = Progress(bar)
        return [fn(p, progress) for p in payloads]
    ctx = _context()
    results: list = [None] * len(payloads)
    with ctx.Manager() as manager, ctx.Pool(min(workers, len(payloads)), initializer=_ignore_sigint) as pool:
        channel = manager.Queue()
        it = pool.imap_unordered(_run, [(i, fn, p, Progress(channel=channel)) for i, p in enumerate(payloads)])
        for _ in payloads:
            while True:
                try:
                    i, results[i] = it.next(timeout=0.25)
                    break
                except multiprocessing.TimeoutError:
                    pass
                finally:
                    _drain(channel, bar)
        _drain(channel, bar)
    return results


def _drain(channel, bar) -> None:
    while True:
        try:
            n = channel.get_nowait()
        except queue.Empty:
            return
        if bar is not None:
            bar.update(n)
