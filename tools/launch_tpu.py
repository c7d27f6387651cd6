#!/usr/bin/env python
"""Launch bioclip_jax training on a Cloud TPU VM or pod slice: create (or reuse) the VM, install the package on every
worker, start the same `bioclip-jax train --distributed ...` on all workers, stream their logs.

    python tools/launch_tpu.py --name bioclip-v4 --zone us-central2-b --accelerator v4-32 \\
        --workdir gs://my-bucket/runs/bioclip -- --config configs/bioclip_vitb16.py --config.data.train=/data/tol10m
    python tools/launch_tpu.py ... --dry-run        # print the exact gcloud commands, run nothing

On TPU VMs jax.distributed.initialize() needs no arguments: every worker finds the others itself. The working copy is
sent as a wheel, with configs/ beside it (what you have checked out is what runs); data and workdir must be reachable from every worker
(a GCS bucket via gcsfuse, or a shared disk).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gcloud_tpu(args, *rest: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", *rest, "--zone", args.zone]
    return command + (["--project", args.project] if args.project else [])


def plan(args, train_args: list[str], wheel: str) -> list[tuple[str, list[str], bool]]:
    """(what, command, may_fail) in order."""
    create = gcloud_tpu(args, "create", args.name, "--accelerator-type", args.accelerator, "--version", args.version)
    if args.spot:
        create.append("--spot")
    remote_wheel = f"~/{Path(wheel).name}"  # our own file name: no quoting, so that ~ expands remotely
    install = " && ".join(["python3 -m pip install -q --upgrade pip", "python3 -m pip install -q 'jax[tpu]'",
                           f"python3 -m pip install -q {remote_wheel}"])
    train = ["bioclip-jax", "train", "--distributed", "--workdir", args.workdir, *train_args]
    run = f"cd ~ && {args.env} {shlex.join(train)} 2>&1 | tee -a ~/bioclip_train.log".strip()
    return [
        ("reuse the VM if it exists", gcloud_tpu(args, "describe", args.name), True),
        ("create the VM", create, False),
        ("copy the package to every worker", gcloud_tpu(args, "scp", wheel, f"{args.name}:{remote_wheel}",
                                                        "--worker=all"), False),
        ("copy configs/ to every worker", gcloud_tpu(args, "scp", "--recurse", str(REPO / "configs"),
                                                     f"{args.name}:~/", "--worker=all"), False),
        ("install on every worker", gcloud_tpu(args, "ssh", args.name, "--worker=all", "--command", install), False),
        ("train on every worker (logs stream here)",
         gcloud_tpu(args, "ssh", args.name, "--worker=all", "--command", run), False),
    ]


def build_wheel(out_dir: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out_dir, str(REPO)], check=True)
    return str(next(Path(out_dir).glob("bioclip_jax-*.whl")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="")
    parser.add_argument("--accelerator", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
    parser.add_argument("--spot", action="store_true", help="preemptible capacity (training resumes on rerun)")
    parser.add_argument("--workdir", required=True, help="shared by all workers, e.g. gs://bucket/run")
    parser.add_argument("--env", default="", help="extra environment for the training command, e.g. 'XLA_FLAGS=...'")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"]
    if not any(a == "--config" or a.startswith("--config=") for a in train_args):
        parser.error("pass the training arguments after --, e.g. -- --config configs/bioclip_vitb16.py")

    with tempfile.TemporaryDirectory() as tmp:
        wheel = f"{tmp}/bioclip_jax-<version>.whl" if args.dry_run else build_wheel(tmp)
        steps = plan(args, train_args, wheel)
        if args.dry_run:
            for what, command, _ in steps:
                print(f"# {what}\n{shlex.join(command)}")
            return 0
        describe = subprocess.run(steps[0][1], capture_output=True, text=True)
        for what, command, _ in steps[1 if describe.returncode else 2:]:
            print(f"==> {what}: {shlex.join(command)}", flush=True)
            subprocess.run(command, check=True)  # argument lists, never a shell on this side
    return 0


if __name__ == "__main__":
    sys.exit(main())
