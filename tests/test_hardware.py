"""The one hardware table: every TPU generation the planner accepts is complete and found by the `device_kind` JAX
reports, the input pipeline's images/s follow from the peak, and the slice sizes agree with the TPU launcher's."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from bioclip_jax import hardware
from bioclip_jax.models.config import get_model_config
from bioclip_jax.train import metrics, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("generation", sorted(hardware.TPUS))
def test_every_generation_the_planner_accepts_has_every_field(generation):
    shape = "2x2x1" if hardware.TPUS[generation].topology_dims == 3 else "2x2"
    topology = plan.parse_topology(f"{generation}:{shape}")
    chip = topology.chip
    assert chip is hardware.TPUS[generation] and topology.chips == 4
    assert all(getattr(chip, f.name) not in (None, "", 0, ()) for f in dataclasses.fields(chip)), chip
    assert hardware.find(chip.device_kind) is chip  # the kind JAX reports on that chip leads back to it
    assert metrics.peak_flops(chip.device_kind) == chip.peak_bf16_flops


def test_tpu_kinds_match_exactly_and_gpu_kinds_by_product_name():
    assert hardware.find("TPU v5").name == "v5p" and hardware.find("TPU v5 lite").name == "v5e"
    assert hardware.find("NVIDIA H100 80GB HBM3").name == "H100"
    assert hardware.find("TPU v3") is None and hardware.find("cpu") is None


@pytest.mark.parametrize("accelerator", hardware.ACCELERATORS.values(), ids=lambda a: a.name)
def test_b16_images_per_s_is_the_peak_at_40_percent_mfu(accelerator):
    pairs_per_s = accelerator.peak_bf16_flops * 0.4 / metrics.train_flops_per_pair(get_model_config("ViT-B-16"))
    assert accelerator.b16_images_per_s == round(pairs_per_s, -1)


def test_hosts_agree_with_the_tpu_launcher():
    spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "tools" / "launch_tpu.py")
    launch_tpu = importlib.util.module_from_spec(spec)
    sys.modules["launch_tpu"] = launch_tpu  # dataclasses look their module up there
    spec.loader.exec_module(launch_tpu)
    for name in ["v4-8", "v4-32", "v5p-128", "v5litepod-4", "v5litepod-8", "v5litepod-256", "v6e-8", "v6e-64"]:
        s = launch_tpu.parse_accelerator(name)
        assert hardware.TPUS[s.generation].hosts(s.chips) == s.hosts, name
        assert plan.parse_topology(name).chips == s.chips, name
