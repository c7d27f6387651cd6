#!/usr/bin/env python
"""Compile time and per-chip memory of the recipes' training steps for TPU slices, side by side in one run.

    python tools/bench_plan.py                     # B/16 on v5e:2x2 (128/chip) and L/14 on v5p:2x2x1 (256/chip)
    python tools/bench_plan.py --only b16 --scan on

Each cell is one `bioclip-jax plan` in its own process (deviceless through libtpu: `pip install -e '.[tpu-plan]'`),
run one after the other so that they do not share the CPU:
- `full`: the compile `train` runs (XLA's default effort), as `bioclip-jax plan` runs it;
- `quick`: `bioclip-jax plan --quick` (exec-time optimisation effort -1);
- `full, one arena`: the full compile with glibc limited to one malloc arena, as the CLI set it for every command
  (`bioclip_jax.runtime.tune_for_cpu`) before the planner stopped doing so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bioclip_jax.train.plan import parse_topology, read_line

CASES = {
    "b16": ("bioclip_vitb16", "v5e:2x2", 512),
    "l14": ("bioclip2_vitl14", "v5p:2x2x1", 1024),
}
MODES = {
    "full": [],
    "quick": ["--quick"],
    "full, one arena": [],
}
ONE_ARENA = ("import sys; from bioclip_jax.runtime import keep_freed_host_memory; keep_freed_host_memory(); "
             "from bioclip_jax.cli import main; sys.argv[0] = 'bioclip-jax'; sys.exit(main(sys.argv[1:]))")


def run(config: str, topology: str, batch: int, scan: bool, mode: str) -> tuple[str, str, str]:
    args = ["plan", "--config", config, "--topology", topology, f"--config.train.global_batch_size={batch}",
            f"--config.scan_layers={scan}", *MODES[mode]]
    command = ([sys.executable, "-c", ONE_ARENA, *args] if mode == "full, one arena"
               else [sys.executable, "-m", "bioclip_jax", *args])
    done = subprocess.run(command, capture_output=True, text=True)
    result = read_line(done.stdout)
    if result is None:
        return "error", "", (done.stderr.strip().splitlines() or ["no output"])[-1][:80]
    fits, gib, seconds = result
    return "yes" if fits else "no", f"{gib:.2f}", f"{seconds:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="a recipe (default: both)")
    parser.add_argument("--scan", choices=["on", "off", "both"], default="both")
    parser.add_argument("--mode", choices=sorted(MODES), action="append", help="compile mode (default: all)")
    args = parser.parse_args()
    scans = {"on": [True], "off": [False], "both": [False, True]}[args.scan]
    print(f"# bioclip-jax plan compile, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| recipe | topology, per-chip batch | scan_layers | compile | fits | GiB/chip | compile s |")
    print("|---|---|---|---|---|---:|---:|")
    for case in args.only or list(CASES):
        config, topology, batch = CASES[case]
        chips = parse_topology(topology).chips
        for scan in scans:
            for mode in args.mode or list(MODES):
                if mode == "full, one arena" and not scan:
                    continue  # the arena's cost shows on the scanned step; the unrolled one compiles far longer
                fits, gib, seconds = run(config, topology, batch, scan, mode)
                print(f"| {config} | {topology}, {batch // chips} | {'on' if scan else 'off'} | {mode} | {fits} | "
                      f"{gib} | {seconds} |", flush=True)


if __name__ == "__main__":
    main()
