"""Training records that could not be read or decoded: the input pipeline replaces each with another example and
says so in its host batches; this counts them over all processes and stops a run whose data is broken."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from bioclip_jax.errors import InputError


class SkippedRecords:
    """The training records replaced because they could not be read or decoded, over all processes: `add` each host
    batch, `check` at the steps the trainer logs (the same on every process) returns the run's total so far and
    raises InputError once more than `max_fraction` of the examples seen (and more than one; with 0, any) were
    replaced."""

    def __init__(self, max_fraction: float, global_batch_size: int, keep: int = 5):
        self.max_fraction, self.global_batch_size, self.keep = float(max_fraction), global_batch_size, keep
        self.count, self.batches, self.first = 0, 0, []

    def add(self, host_batch: dict) -> None:
        self.batches += 1
        self.count += int(host_batch.get("skipped", 0))
        self.first += list(host_batch.get("skipped_records", ()))[:self.keep - len(self.first)]

    def check(self) -> int:
        total = self.count
        if jax.process_count() > 1:  # every process must reach the same verdict
            total = int(np.sum(multihost_utils.process_allgather(np.int64(self.count))))
        seen = self.batches * self.global_batch_size
        # One bad record early in a long run is tolerated (it is not yet a fraction of anything); 0 tolerates none.
        if total > (max(1.0, self.max_fraction * seen) if self.max_fraction > 0 else 0):
            raise InputError(f"{total} of the {seen} training examples read so far could not be read or decoded and "
                             f"were replaced (more than data.max_skipped_fraction={self.max_fraction:g}); first: "
                             f"{' | '.join(self.first) or '(on other processes)'}")
        return total


# ------------------------------------------------------------------------------------------------------- evaluation
