"""bioclip-jax plan: compile the training step for a TPU slice (no TPU needed) and check that it fits."""

from __future__ import annotations

import sys

from bioclip_jax.cli import common
from bioclip_jax.errors import first_line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile the training step for a TPU slice (no TPU needed) and check it fits",
        description="Compiles the trainer's step for TOPOLOGY and prints per-chip memory against HBM, FLOPs and "
                    "collectives, ending with a line 'plan: fits=yes|no chips=N per_chip_batch=B per_chip_gib=X "
                    "hbm_gib=Y compile_s=Z', after the run's steps and an estimate of its time and chip-hours. With "
                    "--search GENERATION it finds the smallest slice that fits and the cheapest in chip-hours. "
                    "Exit 0: fits; 1: does not fit; 2: bad input; 3: the compiler failed otherwise. Config "
                    "overrides: --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="config file, e.g. configs/bioclip_vitb16.py")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology",
                       help="Cloud name (v5litepod-256, v5e-256, v4-32, v5p-128, v6e-64), JAX name (v5e:16x16, "
                            "v4:2x2x1) or cpu:N (N fake CPU devices: a dry run of the shardings)")
    where.add_argument("--search", metavar="GENERATION",
                       help="v4, v5e, v5p or v6e: find the smallest slice that fits with remat full and with remat "
                            "dots (several compiles, each printed), and the cheapest in chip-hours")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="utilisation of the chip's bf16 peak the time estimate assumes, of the FLOPs executed "
                        "(remat recomputation included; default 0.4)")
    p.add_argument("--examples", type=int, default=0,
                   help="training-split size for an epochs-based recipe's step count (default: its shards if "
                        "present, else the published size of the dataset it names)")
    p.add_argument("--quick", action="store_true",
                   help="compile much faster without XLA's speed optimisations (exec-time effort -1): for searching; "
                        "the memory is then what the step needs without them, at or under train's (docs/tpu.md has "
                        "both measured)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Exit 0 when the step fits the chips' memory, 1 when it does not, 2 on bad input (main's error handler), 3 when
    the compiler fails for another reason."""
    import os

    # libtpu lets one process per host load it unless told otherwise; a planner shares its host with other work.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from bioclip_jax.train import plan

    topology = plan.parse_topology(args.topology) if args.topology else None
    if topology is not None and topology.platform == "cpu":
        plan.topology_devices(topology)  # fakes the CPU devices before anything starts JAX's backend
    config = common.load_config(args)
    try:
        if topology is None:
            found = plan.search(config, args.search, quick=args.quick, mfu=args.mfu, examples=args.examples,
                                progress=lambda r: print(r.line(), flush=True))
            print(plan.search_report(config, args.search, found))
            return 0 if found else 1
        result = plan.plan(config, topology, quick=args.quick, mfu=args.mfu, examples=args.examples)
    except common.USER_ERRORS:  # bad input: main prints it as one line
        raise
    except Exception as e:  # noqa: BLE001 - not a verdict on memory: keep 1 meaning "does not fit" for scripts
        print(f"bioclip-jax plan: compilation failed: {first_line(e)}", file=sys.stderr)
        return 3
    print(plan.report(result))
    return 0 if result.fits else 1
