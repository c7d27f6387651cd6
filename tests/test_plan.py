"""`bioclip-jax plan`: topology names, the compiled step's fit / no-fit on a TPU slice (deviceless, through libtpu),
the cpu:N dry run, exit codes, the collectives count, and the MFU peak table keyed by real `device_kind` strings."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bioclip_jax.errors import InputError
from bioclip_jax.train import metrics, plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_train.py"
LINE = re.compile(r"^plan: fits=(yes|no) chips=(\d+) per_chip_batch=(\d+) per_chip_gib=(\d+\.\d\d) "
                  r"hbm_gib=([\d.]+) compile_s=(\d+\.\d)$")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="deviceless TPU compilation needs libtpu: pip install -e '.[tpu-plan]'")


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bioclip_jax", "plan", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)


def plan_line(done: subprocess.CompletedProcess) -> re.Match:
    last = done.stdout.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, f"last line {last!r} is not the plan line; stderr: {done.stderr[-2000:]}"
    return match


@pytest.mark.parametrize("name, jax_name, chips", [
    ("v5litepod-256", "v5e:16x16", 256), ("v5e-256", "v5e:16x16", 256), ("v5litepod-4", "v5e:2x2", 4),
    ("v5e-8", "v5e:2x4", 8), ("v6e-64", "v6e:8x8", 64), ("v6e-32", "v6e:4x8", 32),
    # v4 and v5p Cloud names count TensorCores, two per chip.
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v4-64", "v4:2x4x4", 32), ("v4-128", "v4:4x4x4", 64),
    ("v5p-128", "v5p:4x4x4", 64), ("v5p-256", "v5p:4x4x8", 128), ("v5p-1024", "v5p:8x8x8", 512),
    ("v5e:16x16", "v5e:16x16", 256), ("V4:2x2x1", "v4:2x2x1", 4), ("v5p:2x2x1", "v5p:2x2x1", 4),
])
def test_topology_names(name, jax_name, chips):
    topology = plan.parse_topology(name)
    assert (topology.platform, topology.name, topology.chips) == ("tpu", jax_name, chips)


def test_cpu_topology():
    assert plan.parse_topology("cpu:8") == plan.Topology("cpu", "cpu:8", 8)


@pytest.mark.parametrize("name, message", [
    ("v7-8", "unknown TPU generation 'v7'"), ("v4-7", "not a multiple of 2"), ("v5e:2x2x1", "2 dimensions"),
    ("v4:2x2", "3 dimensions"), ("v5e-12", "no standard shape"), ("tpu", "unknown topology"), ("cpu:0", "N >= 1"),
])
def test_bad_topology_names(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan.parse_topology(name)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("TPU v3", 0.0), ("cpu", 0.0),
])
def test_peak_flops_by_device_kind(kind, peak):
    assert metrics.peak_flops(kind) == peak


HLO = """\
HloModule step

%async_collective_fusion.1 (p: bf16[4,8]) -> bf16[16,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%p), channel_id=3, dimensions={0}
}

%async_collective_fusion.2 (p: bf16[4,8]) -> bf16[16,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[16,8]{1,0} all-gather(%p), channel_id=3, dimensions={0}
}

%all-reduce-scatter (input: f32[16,8]) -> f32[4,8] {
  %input = f32[16,8]{1,0} parameter(0)
  %all-reduce.9 = f32[16,8]{1,0} all-reduce(%input), channel_id=9, to_apply=%add
  ROOT %dynamic-slice.1 = f32[4,8]{1,0} dynamic-slice(%all-reduce.9, %i, %j), dynamic_slice_sizes={4,8}
}

%cond.3 (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%region_2.9_spmd.clone (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]) parameter(0)
  %all-reduce-start.4 = f32[8]{0} all-reduce-start(%x), channel_id=4, to_apply=%add
  %all-reduce-done.4 = f32[8]{0} all-reduce-done(%all-reduce-start.4)
  ROOT %t = (s32[], f32[8]) tuple(%i, %all-reduce-done.4)
}

ENTRY %main (a: bf16[4,8]) -> f32[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %f1 = bf16[16,8]{1,0} fusion(%a), kind=kCustom, calls=%async_collective_fusion.1
  %f2 = bf16[16,8]{1,0} fusion(%a), kind=kCustom, calls=%async_collective_fusion.2
  %w = (s32[], f32[8]) while(%init), condition=%cond.3, body=%region_2.9_spmd.clone
  %all-reduce.7 = (f32[], f32[8]) all-reduce(%x, %y), channel_id=7, to_apply=%add
  ROOT %rs = f32[4,8]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
}
"""


def test_count_collectives():
    counts = plan.count_collectives(HLO)
    assert counts == {
        "all-gather": {"ops": 1, "instructions": 2, "in_loops": 0},  # one transfer split over two fusions
        "all-reduce": {"ops": 2, "instructions": 2, "in_loops": 1},  # the async pair counts once; one in a loop
        "reduce-scatter": {"ops": 1, "instructions": 1, "in_loops": 0},  # all-reduce + dynamic-slice
    }


@pytest.mark.integration  # runs the plan command in subprocesses
def test_bad_input_exits_2():
    unknown = run_plan("--config", str(TINY), "--topology", "v9-8")
    assert unknown.returncode == 2
    last = unknown.stderr.strip().splitlines()[-1]
    assert last.startswith("bioclip-jax plan: error: topology 'v9-8': unknown TPU generation 'v9'")
    indivisible = run_plan("--config", str(TINY), "--topology", "cpu:8", "--config.train.global_batch_size=12")
    assert indivisible.returncode == 2
    assert "global batch size 12 is not divisible by the 8 devices" in indivisible.stderr.strip().splitlines()[-1]
    bad_key = run_plan("--config", str(TINY), "--topology", "cpu:8", "--config.train.batch=8")
    assert bad_key.returncode == 2 and "unknown config key 'train.batch'" in bad_key.stderr


@pytest.mark.integration  # compiles for a TPU slice in a subprocess
@needs_libtpu
def test_libtpu_off_a_tpu_vm_prints_no_errors():
    """libtpu loaded on a host without TPU chips looks for the VM's worker hostnames; it must not print its
    INVALID_ARGUMENT error and source trace on every plan (runtime.quiet_libtpu)."""
    done = run_plan("--config", str(TINY), "--topology", "v5e:2x4", "--config.train.global_batch_size=12")
    assert done.returncode == 2  # the 8 TPU devices were built (libtpu loaded), then the batch was refused
    assert "not divisible by the 8 devices" in done.stderr
    for noise in ("E0000", "INVALID_ARGUMENT", "Source Location Trace", "could not determine TPU"):
        assert noise not in done.stderr, done.stderr


@pytest.mark.integration  # runs the plan command in subprocesses
@pytest.mark.parametrize("scan", [False, True])
def test_cpu_dry_run(scan):
    done = run_plan("--config", str(TINY), "--topology", "cpu:8", "--config.train.global_batch_size=16",
                    "--config.train.fsdp=True", f"--config.scan_layers={scan}")
    assert done.returncode == 0, done.stderr[-3000:]
    fits, chips, per_chip, gib, _, _ = plan_line(done).groups()
    assert (fits, chips, per_chip) == ("yes", "8", "2") and float(gib) > 0
    assert "topology     cpu:8 (cpu): 8 chips" in done.stdout
    gathers = next(line for line in done.stdout.splitlines() if line.startswith("collective   all-gather"))
    # FSDP gathers the sharded params; scanned, each layer's inside the loop (not the whole stack before it).
    assert ("inside loops" in gathers) is scan, gathers


@pytest.mark.parametrize("message, gib", [
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 16.03G of 15.75G hbm. Exceeded hbm capacity "
     "by 35.00M.", 16.03),
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (24.38G) exceeds "
     "available HBM (15.75G).", 24.38),
])
def test_exceeded_memory_is_read_from_xlas_error(message, gib):
    used, reason = plan._exceeded_bytes("XlaRuntimeError: " + message + "\n")
    assert used / 2 ** 30 == pytest.approx(gib) and reason == message


def test_read_line_reads_back_the_plan_line():
    result = plan.Plan(plan.parse_topology("v5e:2x2"), "TPU v5 lite", 256, 1024, 16, False, 101.26,
                       {"total": 15.79 * plan.GIB})
    assert plan.read_line("compiling...\n" + plan.report(result) + "\n") == (False, 15.79, 101.3)
    assert plan.read_line("bioclip-jax plan: error: unknown topology") is None


@pytest.mark.parametrize("scanned", [False, True])
def test_flops_line_says_when_xla_counts_a_scanned_layer_once(scanned):
    result = plan.Plan(plan.parse_topology("v5e:2x2"), "TPU v5 lite", 128, 512, 16, True, 80.0,
                       {"arguments": 0, "outputs": 0, "aliased": 0, "temporaries": 0, "code": 0, "total": 0},
                       xla_flops=5.6e12, analytic_flops=63.1e12,
                       hlo=HLO if scanned else HLO.replace(" while(", " call("))
    flops = next(line for line in plan.report(result).splitlines() if line.startswith("flops/step"))
    if scanned:  # the loop body (one layer) is counted once: a ratio would read as 0.09 of the analytic count
        assert "each scanned layer counted once" in flops and "x0.09" not in flops
    else:
        assert "(x0.09:" in flops


@pytest.mark.integration  # compiles for a TPU slice in a subprocess
@needs_libtpu
def test_tpu_fits():
    done = run_plan("--config", str(TINY), "--topology", "v5litepod-4", "--config.train.global_batch_size=64",
                    "--config.dtype=bfloat16")
    assert done.returncode == 0, done.stderr[-3000:]
    fits, chips, per_chip, gib, hbm, _ = plan_line(done).groups()
    assert (fits, chips, per_chip, hbm) == ("yes", "4", "16", "16")
    assert 0 < float(gib) < 1
    assert "v5e:2x2 (TPU v5 lite)" in done.stdout
    # Data parallel: one gather (the text features), the reduce-scatter of its gradient, all-reduces for the
    # text->image softmax and the gradients.
    assert "collective   all-gather: 1 executed" in done.stdout
    assert "collective   reduce-scatter: 1 executed" in done.stdout


@pytest.mark.integration  # compiles for a TPU slice in a subprocess
@needs_libtpu
def test_tpu_quick_compile_says_so():
    done = run_plan("--config", str(TINY), "--topology", "v5e:2x2", "--config.train.global_batch_size=64",
                    "--config.dtype=bfloat16", "--config.scan_layers=True", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    assert plan_line(done).group(1) == "yes"
    assert "(--quick: XLA's exec-time optimisation effort -1, so the memory is without" in done.stdout


def test_quick_plan_leaves_the_compiler_effort_as_it_was():
    from bioclip_jax.train.config import load_config

    before = jax.config.jax_exec_time_optimization_effort
    result = plan.plan(load_config(str(TINY), ["train.global_batch_size=2"]), "cpu:1", quick=True)
    assert result.fits and result.quick
    assert jax.config.jax_exec_time_optimization_effort == before


@pytest.mark.integration  # compiles for a TPU slice in a subprocess
@needs_libtpu
def test_tpu_does_not_fit():
    # 32,768 pairs per chip: the [32768, 131072] float32 logits alone take 16 GiB of a v5e chip's 16.
    done = run_plan("--config", str(TINY), "--topology", "v5e:2x2", "--config.train.global_batch_size=131072",
                    "--config.dtype=bfloat16")
    assert done.returncode == 1, done.stderr[-3000:]
    fits, chips, per_chip, gib, hbm, _ = plan_line(done).groups()
    assert (fits, chips, per_chip, hbm) == ("no", "4", "32768", "16")
    assert float(gib) > 16
    assert "does not fit: RESOURCE_EXHAUSTED" in done.stdout


def test_libtpu_without_chips_is_a_cpu_host(monkeypatch):
    """libtpu is installed on CPU hosts to plan TPU runs: the CPU tuning (runtime.tune_for_cpu) must still apply."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    from bioclip_jax import runtime

    monkeypatch.setattr(runtime, "has_tpu_chips", lambda: False)
    assert runtime.cpu_only() is (real_find_spec("jax_plugins") is None)
    monkeypatch.setattr(runtime, "has_tpu_chips", lambda: True)
    assert runtime.cpu_only() is False


def test_planner_keeps_the_default_allocator(monkeypatch, capsys):
    """One malloc arena (runtime.tune_for_cpu) serialises the TPU compiler's threads: plan must not set it."""
    from bioclip_jax import cli, runtime

    monkeypatch.setattr(runtime, "tune_for_cpu", lambda: pytest.fail("plan tuned the allocator for CPU steps"))
    assert cli.main(["plan", "--config", str(TINY), "--topology", "v9-8"]) == 2  # bad input: returns before compiling
    assert "unknown TPU generation 'v9'" in capsys.readouterr().err


def test_loss_matches_open_clip_with_and_without_the_gather_constraint():
    import jax
    import numpy as np
    import torch
    from open_clip.loss import ClipLoss

    from bioclip_jax.mesh import make_mesh, replicated
    from bioclip_jax.models.loss import clip_loss

    rng = np.random.default_rng(0)
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 16, 8)))
    scale = np.float32(1 / 0.07)  # the model returns exp(logit_scale)
    expected = ClipLoss()(torch.tensor(image), torch.tensor(text), torch.tensor(scale)).item()
    mesh = make_mesh()
    for sharding in (None, replicated(mesh)):
        loss = jax.jit(lambda i, t, s: clip_loss(i, t, s, sharding))(image, text, scale)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def _fitting(chips: int, remat: str = "full", steps: int = 1000, accum: int = 1, xla_bytes: float = 0.0) -> plan.Plan:
    topology = plan.parse_topology(f"v5p-{2 * chips}")
    memory = dict.fromkeys(("arguments", "outputs", "aliased", "temporaries", "code", "total"), 0)
    return plan.Plan(topology, "TPU v5", 1024 // chips, 1024, 95, True, 10.0, memory, xla_flops=4e15,
                     analytic_flops=3e15, remat=remat, steps=steps, steps_note="", accum_steps=accum,
                     xla_bytes=xla_bytes)


def test_step_time_counts_the_recomputation():
    """Full remat runs the forward again (4/3 of the analytic FLOPs), the feature cache of gradient accumulation
    once more: at the same utilisation they cost time, and chip-hours do not depend on the slice."""
    peak = 459e12
    assert _fitting(4, remat="dots").step_s == pytest.approx(3e15 / 4 / (peak * 0.4))
    assert _fitting(4).step_s == pytest.approx(3e15 * 4 / 3 / 4 / (peak * 0.4))
    assert _fitting(4, accum=2).step_s == pytest.approx(3e15 * 5 / 3 / 4 / (peak * 0.4))
    assert _fitting(4).chip_hours == pytest.approx(_fitting(64).chip_hours)
    assert _fitting(4).hours == pytest.approx(1000 * _fitting(4).step_s / 3600)
    # A memory-bound step (XLA: 1 FLOP per byte, far under v5p's ridge of 166) takes its bytes' time instead.
    slow = _fitting(4, remat="dots", xla_bytes=1e15)
    assert slow.step_s == pytest.approx(3e15 / 4 / 1.0 / 2765e9)
    assert "memory-bound" in plan.report(slow) and "compute-bound" in plan.report(_fitting(4, xla_bytes=1e9))


def test_run_steps():
    from bioclip_jax.train.config import load_config

    config = load_config("bioclip_vitb16")  # 100 epochs of TreeOfLife-10M at 32,768
    assert plan.run_steps(config) == (30212, "100 epochs x 9,900,000 images / 32,768 (treeoflife-10m as published, "
                                             "about)")
    assert plan.run_steps(config, examples=32768)[0] == 100
    config.train.epochs, config.train.steps = 0, 500
    assert plan.run_steps(config) == (500, "train.steps")
    config.train.epochs, config.data.train = 2, "/data/mine"
    assert plan.run_steps(config) == (0, "2 epochs of /data/mine: give --examples N")


def test_slice_sizes():
    assert plan.slice_sizes("v5e", 32768) == [4, 8, 16, 32, 64, 128, 256]
    assert plan.slice_sizes("v5p", 100352)[-1] == 2048  # 100,352 = 2^11 x 49
    with pytest.raises(InputError, match="unknown TPU generation 'v9'"):
        plan.slice_sizes("v9", 1024)


def test_search_finds_the_smallest_slice_per_remat_and_the_cheapest(monkeypatch):
    """Bisection over slice sizes: remat full fits 128 rows per chip, dots only 32 (it keeps more), so full needs
    8 chips and dots 32; dots runs no forward twice, so it is the cheaper run in chip-hours."""
    from bioclip_jax.train.config import load_config

    limits, compiled = {"full": 128, "dots": 32}, []

    def fake_plan(config, topology, quick, mfu, examples):
        compiled.append((config.remat, topology.chips))
        result = _fitting(topology.chips, remat=config.remat)
        result.fits = 1024 // topology.chips <= limits[config.remat]
        return result

    monkeypatch.setattr(plan, "plan", fake_plan)
    config = load_config(str(TINY), ["train.global_batch_size=1024"])
    found = plan.search(config, "v5p")
    assert [(p.remat, p.topology.chips) for p in found] == [("full", 8), ("dots", 32)]
    assert plan.cheapest(found).remat == "dots"
    assert len(compiled) <= 4 + 3  # log2 of the 9 sizes per policy, dots starting where full fitted
    text = plan.search_report(config, "v5p", found)
    assert "smallest     v5p:2x2x2, 8 chips (remat full)" in text
    assert "cheapest     v5p:2x4x4, 32 chips (remat dots)" in text
