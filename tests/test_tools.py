"""Launch tooling: the SLURM example is valid bash (the TPU launcher has its own tests: test_launch_tpu.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "slurm_train.sh")], check=True)
