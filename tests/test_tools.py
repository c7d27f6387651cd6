"""Tooling: the SLURM example is valid bash, and plan_table's search brackets the largest fitting batch (the TPU
launcher has its own tests: test_launch_tpu.py)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "slurm_train.sh")], check=True)


def _plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "tools" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit, guess, expected", [(300, 128, 256), (300, 1024, 256), (100, 16, 64), (7, 128, 0),
                                                    (10 ** 6, 1024, 4096)])
def test_plan_table_finds_the_largest_power_of_two_that_fits(monkeypatch, limit, guess, expected):
    table = _plan_table()
    compiled = []

    def fake_plan(recipe, topology, per_chip, remat, fsdp, quick):
        compiled.append(per_chip)
        return per_chip <= limit, per_chip / 100  # GiB grows with the batch

    monkeypatch.setattr(table, "plan", fake_plan)
    best, gib, over = table.largest_fit("bioclip_vitb16", "v5e:2x2", True, False, True, guess)
    assert best == expected
    assert gib == (best / 100 if best else 0.0)
    assert over == (2 * best / 100 if best and 2 * best in compiled else 0.0)
    assert len(compiled) == len(set(compiled))  # no batch compiled twice
