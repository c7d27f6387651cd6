"""`bioclip-jax` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from bioclip_jax.convert.checkpoint import convert_checkpoint

    written, folder = convert_checkpoint(args.src, args.dst, model=args.model,
                                         write_bin=False if args.no_bin else None)
    print(f"wrote {written} model folder {folder}")
    return 0


def _list_models(args) -> int:
    from bioclip_jax.models.config import ALIASES, list_models

    for name in list_models():
        print(f"{name} -> {ALIASES[name]}" if name in ALIASES else name)
    return 0


def _demo(args) -> int:
    from bioclip_jax.demo import run_demo

    run_demo(model_name=args.model, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioclip-jax", description="BioCLIP in JAX: convert, encode, train, evaluate")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="open_clip <-> bioclip_jax weights (direction from SRC's format)",
                       description="SRC in open_clip format (folder with open_clip_config.json, .safetensors, "
                                   ".bin/.pt) becomes a bioclip_jax model folder; a bioclip_jax folder becomes an "
                                   "open_clip folder (open_clip_config.json, .safetensors, .bin).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", help="architecture for bare weight files, e.g. ViT-B-16-quickgelu (BioCLIP)")
    p.add_argument("--no-bin", action="store_true", help="write only safetensors (no torch needed)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("list-models", help="architectures known by name")
    p.set_defaults(func=_list_models)

    p = sub.add_parser("demo", help="embed generated organisms and taxonomic captions; print the similarity table")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # Expected user errors: one clear line, no traceback.
        print(f"bioclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
