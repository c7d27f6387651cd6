"""bioclip-jax demo: the quick-start job."""

from __future__ import annotations

from bioclip_jax.cli import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the quick-start job: synthetic tree of life -> train -> per-rank "
                                           "zero-shot -> open_clip export")
    p.add_argument("--config", default="demo", help="a recipe name or a config file")
    p.add_argument("--workdir", default="runs/demo")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.demo import run_demo

    common.setup_logging()
    config = common.load_config(args)
    run_demo(config, args.workdir, evaluate_fn=common.validation(config))
    return 0
