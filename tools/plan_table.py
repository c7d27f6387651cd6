#!/usr/bin/env python
"""The largest per-chip batch (a power of two) that fits, per recipe, TPU chip, remat and FSDP: docs/tpu.md's table.

    python tools/plan_table.py                                  # both recipes, v4 v5e v5p v6e, remat and FSDP on/off
    python tools/plan_table.py --recipe bioclip_vitb16 --chip v6e --full

Every verdict is a `bioclip-jax plan` compile (its own process) on a 4-chip slice of that generation; the search
doubles or halves the per-chip batch from a guess until it brackets the limit. `--quick` compiles (the default here,
much faster) are what the step needs without XLA's speed optimisations: close to the full compile for some steps,
well under it for others (docs/tpu.md has the measurements); `--full` checks with the compile `train` runs. Data
parallel holds the same per-chip memory on any slice size; FSDP divides the state by the chips, so larger slices fit a
little more.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bioclip_jax import hardware
from bioclip_jax.train.plan import parse_topology, read_line

# Each generation's 4-chip slice and its HBM per chip in GiB.
TOPOLOGIES = {c.name: (f"{c.name}:{'2x2x1' if c.topology_dims == 3 else '2x2'}", round(c.hbm_gib))
              for c in hardware.TPUS.values()}
SMALLEST, LARGEST = 8, 4096


def plan(recipe: str, topology: str, per_chip: int, remat: bool, fsdp: bool, quick: bool) -> tuple[bool, float]:
    """(fits, GiB per chip) from one `bioclip-jax plan`; exit 3 (the compiler failed otherwise) raises."""
    command = [sys.executable, "-m", "bioclip_jax", "plan", "--config", recipe, "--topology", topology,
               f"--config.train.global_batch_size={per_chip * parse_topology(topology).chips}",
               f"--config.train.fsdp={fsdp}",
               *([] if remat else ["--config.remat="]), *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    result = read_line(done.stdout)
    if done.returncode not in (0, 1) or result is None:
        raise RuntimeError(f"{' '.join(command[2:])}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return result[0], result[1]


def largest_fit(recipe, topology, remat, fsdp, quick, guess) -> tuple[int, float, float]:
    """(largest power-of-two per-chip batch that fits, its GiB, the GiB XLA needed at twice that batch)."""
    fits = {}
    batch = guess
    while SMALLEST <= batch <= LARGEST:
        fits[batch] = plan(recipe, topology, batch, remat, fsdp, quick)
        batch = 2 * batch if fits[batch][0] else batch // 2
        if batch in fits:  # bracketed: one batch fits and twice it does not
            break
    best = max((b for b, (ok, _) in fits.items() if ok), default=0)
    return best, fits.get(best, (False, 0.0))[1], fits.get(2 * best, (False, 0.0))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help="default: bioclip_vitb16 and bioclip2_vitl14")
    parser.add_argument("--chip", action="append", choices=sorted(TOPOLOGIES), help="default: all")
    parser.add_argument("--full", action="store_true", help="the compile train runs, instead of --quick")
    args = parser.parse_args()
    print(f"# per-chip batch limits, {'full' if args.full else 'quick'} compiles, {time.strftime('%Y-%m-%d')}")
    print("| recipe | remat | FSDP | chip (HBM) | largest per-chip batch | GiB/chip there | GiB at 2x (does not fit) |")
    print("|---|---|---|---|---:|---:|---:|")
    for recipe in args.recipe or ["bioclip_vitb16", "bioclip2_vitl14"]:
        for remat in (True, False):
            for fsdp in (False, True):
                per_gib = None  # batch per GiB of HBM on the previous chip: the next chip's first guess
                for chip in args.chip or ["v5e", "v4", "v6e", "v5p"]:
                    topology, hbm = TOPOLOGIES[chip]
                    guess = 128 if per_gib is None else max(SMALLEST, 2 ** int(per_gib * hbm).bit_length() // 2)
                    best, gib, over = largest_fit(recipe, topology, remat, fsdp, not args.full, guess)
                    if best:
                        per_gib = best / hbm
                    print(f"| {recipe} | {'dots' if remat else 'off'} | {'on' if fsdp else 'off'} | {chip} ({hbm} "
                          f"GiB) | {best or 'none'} | {gib:.2f} | {over:.2f} |", flush=True)


if __name__ == "__main__":
    main()
