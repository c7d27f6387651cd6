"""Launch tooling: the TPU launcher's dry run prints the exact commands, in order, without running anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tpu_launcher_dry_run_prints_every_step():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "launch_tpu.py"), "--name", "bioclip-v4", "--zone",
                           "us-central2-b", "--accelerator", "v4-32", "--spot", "--workdir", "gs://bucket/run",
                           "--dry-run", "--", "--config", "configs/bioclip_vitb16.py", "--config.train.lr=2e-4"],
                          capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("gcloud")]
    assert [line.split()[4] for line in lines] == ["describe", "create", "scp", "scp", "ssh", "ssh"]
    assert "--accelerator-type v4-32" in lines[1] and "--spot" in lines[1]
    assert all("--worker=all" in line for line in lines[2:])
    assert "bioclip-jax train --distributed --workdir gs://bucket/run --config configs/bioclip_vitb16.py " \
           "--config.train.lr=2e-4" in lines[-1]


def test_tpu_launcher_needs_training_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "launch_tpu.py"), "--name", "x", "--zone", "z",
                           "--workdir", "w", "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 2 and "pass the training arguments after --" in done.stderr


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "slurm_train.sh")], check=True)
