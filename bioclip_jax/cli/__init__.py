"""`bioclip-jax` command line: thin wrappers that parse, call the library and print, one module per command.

Parsing imports no JAX: each command imports what it needs when it runs (a fast `--help`)."""

from __future__ import annotations

import argparse

from bioclip_jax.cli import (
    common,
    convert,
    demo,
    embed,
    eval,
    finetune,
    list_models,
    list_tol_taxa,
    make_shards,
    make_txt_emb,
    plan,
    predict,
    search,
    train,
)

COMMANDS = (convert, predict, list_tol_taxa, eval, make_txt_emb, embed, list_models, train, plan, demo, make_shards,
            search, finetune)


def build_parser() -> argparse.ArgumentParser:
    from bioclip_jax import __version__

    parser = argparse.ArgumentParser(prog="bioclip-jax", description="BioCLIP in JAX: convert, encode, train, evaluate")
    parser.add_argument("--version", action="version", version=f"bioclip-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in common.TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return common.run(args)
