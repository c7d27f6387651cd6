"""On-device top-k (inference/topk.py) against a float64 numpy reference, and sharded over 8 devices as on one."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bioclip_jax.errors import InputError
from bioclip_jax.inference.topk import DeviceBank

ROOT = Path(__file__).resolve().parents[1]
CLASSES, DIM, QUERIES, GROUPS = 1003, 32, 50, 40  # 1003: not a multiple of 8, so the sharded bank is padded


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    queries = rng.normal(size=(QUERIES, DIM)).astype(np.float32)
    groups = rng.integers(0, GROUPS, CLASSES)
    return bank, queries, groups


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(bank, queries, groups, scale=100.0, min_prob=1e-9, normalize=True):
    """Cosine scores, softmax probabilities and group sums in float64 numpy, as pybioclip defines them."""
    bank, queries = bank.astype(np.float64), queries.astype(np.float64)
    scores = _unit(queries) @ _unit(bank).T if normalize else queries @ bank.T
    logits = scale * scores
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    sums = np.zeros((len(queries), groups.max() + 1))
    for g in range(groups.max() + 1):
        kept = np.where(probs > min_prob, probs, 0.0)
        sums[:, g] = kept[:, groups == g].sum(axis=1)
    return scores, probs, sums


def _top(matrix, k):
    idx = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(matrix, idx, axis=1), idx


def _all_modes(bank_obj, queries, groups):
    return {"scores": bank_obj.top_k(queries, 10), "probs": bank_obj.top_k_probs(queries, 5, 100.0),
            "groups": bank_obj.top_k_groups(queries, 5, 100.0, groups, min_prob=1e-9)}


def test_float32_bank_matches_numpy():
    bank, queries, groups = _data()
    results = _all_modes(DeviceBank(bank, dtype=jnp.float32, batch_size=16), queries, groups)  # 4 batches, last 2
    for (values, idx), reference, k in zip(results.values(), _reference(bank, queries, groups), (10, 5, 5)):
        ref_values, ref_idx = _top(reference, k)
        np.testing.assert_array_equal(idx, ref_idx)
        # 5e-6, not 1e-6: a float32 cosine is ~2e-7 off (normalising and a 32-term dot), logit_scale 100 makes that
        # 2e-5 in a logit, and a probability moves by up to p(1 - p) times twice that. numpy's own float32 softmax
        # of these inputs is 1.7e-6 off float64, ours 2.7e-6 (pybioclip computes in float32 too).
        np.testing.assert_allclose(values, ref_values, rtol=0, atol=5e-6)


def test_bfloat16_bank_matches_numpy_on_rounded_inputs():
    """bf16 rounds bank and queries to 8 significant bits (a cosine moves by up to ~4e-3, a logit at scale 100 by up
    to ~0.4, so near-ties may swap against a float32 bank); given the same rounded inputs, only float32 accumulation
    order differs."""
    bank, queries, groups = _data(1)
    rounded = lambda x: np.asarray(jnp.asarray(_unit(x)).astype(jnp.bfloat16).astype(jnp.float32))
    results = _all_modes(DeviceBank(bank), queries, groups)
    references = _reference(rounded(bank), rounded(queries), groups, normalize=False)
    for (values, idx), reference, k in zip(results.values(), references, (10, 5, 5)):
        ref_values, ref_idx = _top(reference, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(values, ref_values, rtol=0, atol=5e-6)


def test_bad_input_is_one_line():
    bank, queries, groups = _data()
    device_bank = DeviceBank(bank)
    with pytest.raises(InputError, match=r"expected \[N, 32\] to match the bank's dimension 32, got shape \(50, 16\)"):
        device_bank.top_k(queries[:, :16], 5)
    with pytest.raises(InputError, match="groups: expected 1003 integer group ids"):
        device_bank.top_k_groups(queries, 5, 100.0, groups[:10])
    with pytest.raises(InputError, match="non-empty"):
        DeviceBank(np.zeros((0, 4)))


_SHARDED = """
import sys, jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, {tests!r})
from test_topk import _data, _all_modes
from bioclip_jax.inference.topk import DeviceBank
bank, queries, groups = _data()
mesh = jax.make_mesh((2, 4), ("data", "model"))
results = _all_modes(DeviceBank(bank, mesh=mesh, batch_size=16), queries, groups)
np.savez({out!r}, **{{f"{{m}}_{{i}}": r[i] for m, r in results.items() for i in (0, 1)}})
"""


@pytest.mark.integration  # a fresh interpreter with 8 CPU devices
def test_sharded_over_8_devices_matches_one_device(tmp_path):
    out = tmp_path / "sharded.npz"
    script = _SHARDED.format(tests=str(ROOT / "tests"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = np.load(out)
    bank, queries, groups = _data()
    for mode, (values, idx) in _all_modes(DeviceBank(bank, batch_size=16), queries, groups).items():
        np.testing.assert_array_equal(sharded[f"{mode}_1"], idx, err_msg=mode)
        # The cosine scores are the same products; the probabilities agree to float32's resolution of the logits
        # (see test_float32_bank_matches_numpy).
        np.testing.assert_allclose(sharded[f"{mode}_0"], values, rtol=0, atol=5e-6 if mode != "scores" else 0)
