"""Top-k similarity on the accelerator: an N x C score matrix never reaches host memory.

A bank (C x D: a class text bank of hundreds of thousands of classes, or a search index of millions of embeddings)
is placed on device once, in bf16 by default, its rows sharded over every device of a mesh; queries [N, D] stream
through in batches. Each device scores its slice of the bank and keeps its own top k; the P x k candidates are
gathered and reduced to the global top k, so only [N, k] values and indices come back to the host.

    bank = DeviceBank(text_embeddings)                         # [C, D]; mesh=None: one device
    scores, idx = bank.top_k(queries, k=10)                    # cosine similarities, best first
    probs, idx = bank.top_k_probs(features, k=5, logit_scale=100.0)
    probs, gid = bank.top_k_groups(features, k=5, logit_scale=100.0, groups=genus_of_species)

- `top_k`: cosine similarity (bank and queries L2-normalised on device unless `normalize=False`); exact with
  `jax.lax.top_k`, or approximate per device with `jax.lax.approx_max_k` given `recall_target` (on TPU; elsewhere
  XLA computes it exactly).
- `top_k_probs`: pybioclip's probabilities: softmax over ALL C classes of `logit_scale * cosine` (the log-sum-exp
  is combined across devices), then the k most probable.
- `top_k_groups`: pybioclip's `--rank` above species: each group's probability is the sum of its classes'
  probabilities above `min_prob` (a segment sum on device, summed across devices), then the k most probable groups.
  A group with no class above `min_prob` scores 0; callers drop those rows as pybioclip does.

Ties go to the lower index, as a stable sort. Scores are computed in float32 from the bank's dtype: with a bf16 bank
the queries are rounded to bf16 too (the MXU's native input) and products accumulate in float32. With a float32
bank the matmul runs at full float32 precision (TPUs would otherwise round to bf16 passes).

Every process of a multi-host mesh passes the same queries and gets the same results. For per-host queries (each
host predicting its own images), give a mesh of that host's local devices.

Device memory: the bank (C x D x 2 bytes in bf16, split over the mesh) plus, per batch, a float32
[batch_size, C / devices] score block.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bioclip_jax.errors import InputError

__all__ = ["DeviceBank", "DeviceGroups"]


class DeviceGroups(NamedTuple):
    """Group ids on device, sharded as the bank's rows (padding rows -1), and the number of groups G."""

    ids: jax.Array
    count: int


_HOST_BLOCK = 65536  # bank rows normalised and cast at a time on the host


def _padded_batch(n: int, batch_size: int) -> int:
    """A full batch, or the next power of two (at least 8) for the last one: few compiled shapes."""
    return batch_size if n >= batch_size else min(batch_size, max(8, 1 << (n - 1).bit_length()))


class DeviceBank:
    """A C x D matrix on device (rows sharded over `mesh`), scored against batches of queries.

    bank: [C, D] array (numpy or anything np.asarray takes). mesh: a jax Mesh whose devices all share the rows
    (every axis is used), or None for one device (this process's first). dtype: the bank's device dtype, bf16 by
    default (half the memory; see the module docstring for the precision). normalize: L2-normalise bank rows and
    queries, so scores are cosine similarities. batch_size: queries per device step. columns: `bank` is [D, C]
    (pybioclip's text embeddings), turned into rows on device.
    """

    def __init__(self, bank, mesh: Mesh | None = None, dtype: Any = jnp.bfloat16, normalize: bool = True,
                 batch_size: int = 256, columns: bool = False):
        bank = np.asarray(bank)
        if bank.ndim != 2 or not bank.shape[0] or not bank.shape[1]:
            raise InputError(f"bank: expected a non-empty [{'dim, classes' if columns else 'classes, dim'}] matrix, "
                             f"got shape {bank.shape}")
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.local_devices()[:1]), ("bank",))
        self.axes = tuple(self.mesh.axis_names)
        self.size, self.dim = bank.shape[::-1] if columns else bank.shape
        self.normalize, self.batch_size, self.dtype = normalize, batch_size, jnp.dtype(dtype)
        shards = self.mesh.devices.size
        self.padded = -(-self.size // shards) * shards
        self.rows_sharding = NamedSharding(self.mesh, P(self.axes))
        self.replicated = NamedSharding(self.mesh, P())
        local = len(self.mesh.local_devices) == shards
        self.array = self._from_columns(bank) if columns and local else self._from_rows(bank.T if columns else bank)
        self._functions: dict = {}

    def _from_rows(self, bank: np.ndarray) -> jax.Array:
        rows = np.zeros((self.padded, self.dim), self.dtype)
        for start in range(0, self.size, _HOST_BLOCK):  # never a float32 copy of a million-row bank
            block = np.asarray(bank[start:start + _HOST_BLOCK], np.float32)
            if self.normalize:
                block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            rows[start:start + len(block)] = block
        return jax.make_array_from_callback(rows.shape, self.rows_sharding, lambda index: rows[index])

    def _from_columns(self, bank: np.ndarray) -> jax.Array:
        """A [D, C] matrix (pybioclip's text bank layout) onto one device as it is, then transposed, normalised, padded
        and split over the mesh there: no host copy of the bank (the mesh must be this process's devices)."""
        def place(columns):
            rows = columns.T.astype(jnp.float32)
            if self.normalize:
                rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            return jnp.pad(rows, ((0, self.padded - self.size), (0, 0))).astype(self.dtype)

        # Prepared on the first device, then split over the mesh (a jit from a committed one-device input straight to
        # the mesh's sharding is refused: incompatible devices).
        rows = jax.jit(place)(jax.device_put(bank, self.mesh.devices.flat[0]))
        return jax.device_put(rows, self.rows_sharding)

    def put_groups(self, groups) -> "DeviceGroups":
        """Group ids [C] (ints in [0, G), e.g. each species' genus) on device beside the rows, for `top_k_groups`;
        place them once and reuse them across calls."""
        groups = np.asarray(groups)
        if groups.shape != (self.size,) or not np.issubdtype(groups.dtype, np.integer):
            raise InputError(f"groups: expected {self.size} integer group ids (one per bank row), "
                             f"got {groups.dtype} of shape {groups.shape}")
        if groups.size and groups.min() < 0:
            raise InputError(f"groups: ids must be >= 0, got {groups.min()}")
        padded = np.full(self.padded, -1, np.int32)  # -1: dropped by the segment sum
        padded[:self.size] = groups
        ids = jax.make_array_from_callback(padded.shape, self.rows_sharding, lambda index: padded[index])
        return DeviceGroups(ids, int(groups.max()) + 1)

    def top_k(self, queries, k: int, recall_target: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores [N, k] (float32) and bank row indices [N, k] (int32), best first. k is capped at C.
        recall_target (e.g. 0.95): approximate per-device top k (jax.lax.approx_max_k)."""
        k = min(k, self.size)
        fn = self._compiled("scores", k, recall_target)
        return self._run(queries, lambda q: fn(self.array, q))

    def top_k_probs(self, queries, k: int, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """softmax over all C classes of logit_scale * cosine: the k largest probabilities [N, k] and their class
        indices [N, k], best first (pybioclip's species probabilities)."""
        k = min(k, self.size)
        fn = self._compiled("probs", k, None)
        scale = jnp.float32(logit_scale)
        return self._run(queries, lambda q: fn(self.array, q, scale))

    def top_k_groups(self, queries, k: int, logit_scale: float, groups, min_prob: float = 0.0
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Per-group sums of the class probabilities above `min_prob`: the k largest [N, k] and their group ids
        [N, k]. groups: `put_groups`'s result (or the ids [C], placed on each call)."""
        if not isinstance(groups, DeviceGroups):
            groups = self.put_groups(groups)
        fn = self._compiled("groups", min(k, groups.count), groups.count)
        scale, floor = jnp.float32(logit_scale), jnp.float32(min_prob)
        return self._run(queries, lambda q: fn(self.array, groups.ids, q, scale, floor))

    def _run(self, queries, step) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries: expected [N, {self.dim}] to match the bank's dimension {self.dim}, "
                             f"got shape {queries.shape}")
        pending = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start:start + self.batch_size]
            batch = np.zeros((_padded_batch(len(chunk), self.batch_size), self.dim), np.float32)
            batch[:len(chunk)] = chunk
            q = jax.make_array_from_callback(batch.shape, self.replicated, lambda index, b=batch: b[index])
            pending.append((len(chunk), step(q)))  # dispatched asynchronously: the next batch uploads meanwhile
        if not pending:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32)
        values = [np.asarray(v.addressable_data(0))[:n] for n, (v, _) in pending]
        indices = [np.asarray(i.addressable_data(0))[:n] for n, (_, i) in pending]
        return np.concatenate(values), np.concatenate(indices)

    def _compiled(self, mode: str, k: int, extra):
        """One jitted shard_map per (mode, k, recall_target or group count); jit caches each batch shape."""
        if (mode, k, extra) not in self._functions:
            self._functions[mode, k, extra] = self._build(mode, k, extra)
        return self._functions[mode, k, extra]

    def _build(self, mode: str, k: int, extra):
        body = {"scores": self._scores_body, "probs": self._probs_body, "groups": self._groups_body}[mode]
        rows, rep = P(self.axes), P()
        in_specs = {"scores": (rows, rep), "probs": (rows, rep, rep), "groups": (rows, rows, rep, rep, rep)}[mode]
        mapped = jax.shard_map(functools.partial(body, k, extra), mesh=self.mesh, in_specs=in_specs,
                               out_specs=(rep, rep), check_vma=False)
        return jax.jit(mapped)

    def _local_scores(self, rows, q):
        """This device's float32 scores [n, C/P] and a mask of its real (not padding) rows."""
        if self.normalize:
            q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        full = self.dtype == jnp.float32
        scores = jnp.dot(q.astype(self.dtype), rows.T, preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST if full else None)
        local = rows.shape[0]
        first = jax.lax.axis_index(self.axes) * local
        valid = (first + jnp.arange(local)) < self.size
        return scores, valid, first

    def _merge_top_k(self, values, first, k: int, recall_target: float | None = None):
        """Each device's top k of its [n, C/P] values, gathered and reduced to the global top k (global indices)."""
        local_k = min(k, values.shape[1])
        if recall_target is None:
            top, idx = jax.lax.top_k(values, local_k)
        else:
            top, idx = jax.lax.approx_max_k(values, local_k, recall_target=recall_target)
        top = jax.lax.all_gather(top, self.axes, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx + first, self.axes, axis=1, tiled=True)
        best, where = jax.lax.top_k(top, k)
        return best, jnp.take_along_axis(idx, where, axis=1).astype(jnp.int32)

    def _scores_body(self, k, recall_target, rows, q):
        scores, valid, first = self._local_scores(rows, q)
        return self._merge_top_k(jnp.where(valid, scores, -jnp.inf), first, k, recall_target)

    def _log_probs(self, rows, q, scale):
        """log softmax over all C classes of scale * cosine, this device's slice [n, C/P] (padding: -inf)."""
        scores, valid, first = self._local_scores(rows, q)
        logits = jnp.where(valid, scale * scores, -jnp.inf)
        top = jax.lax.pmax(jnp.max(logits, axis=1, keepdims=True), self.axes)
        shifted = logits - top  # before the log-sum-exp: near the top it is exact, where top + log(total) would round
        total = jax.lax.psum(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True), self.axes)
        return shifted - jnp.log(total), first

    def _probs_body(self, k, _, rows, q, scale):
        log_probs, first = self._log_probs(rows, q, scale)
        best, idx = self._merge_top_k(log_probs, first, k)
        return jnp.exp(best), idx

    def _groups_body(self, k, num_groups, rows, groups, q, scale, min_prob):
        log_probs, _ = self._log_probs(rows, q, scale)
        probs = jnp.exp(log_probs)
        probs = jnp.where(probs > min_prob, probs, 0.0)
        ids = jnp.where(groups >= 0, groups, num_groups)  # out of range: segment_sum drops padding rows
        sums = jax.ops.segment_sum(probs.T, ids, num_segments=num_groups).T
        sums = jax.lax.psum(sums, self.axes)
        best, idx = jax.lax.top_k(sums, k)
        return best, idx.astype(jnp.int32)
