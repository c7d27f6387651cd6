"""bioclip-jax train: train or fine-tune, resuming from the workdir's latest checkpoint."""

from __future__ import annotations

import sys

from bioclip_jax.cli import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune (resumes from the workdir's latest checkpoint)",
                              description="Config overrides: --config.KEY=VALUE, e.g. --config.train.lr=3e-4.")
    p.add_argument("--config", required=True,
                   help="a recipe name (demo, bioclip_vitb16, bioclip2_vitl14) or a config file")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard events go here")
    common.add_distributed_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.train.stopping import EXIT_CODES
    from bioclip_jax.train.trainer import train

    common.setup_logging()
    common.initialize_distributed(args)
    config = common.load_config(args)
    result = train(config, args.workdir, evaluate_fn=common.validation(config))
    if result.history:
        print(f"step {result.step}: loss {result.history[-1]['loss']:.4f}")
    if result.stopped_by:
        print(f"bioclip-jax train: stopped by {result.stopped_by} after saving step {result.step} in "
              f"{result.workdir}; rerun the same command to resume", file=sys.stderr)
        return EXIT_CODES[result.stopped_by]
    return 0
