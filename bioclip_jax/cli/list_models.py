"""bioclip-jax list-models: the architectures known by name."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list-models", help="architectures known by name")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.models.config import ALIASES, list_models

    for name in list_models():
        print(f"{name} -> {ALIASES[name]}" if name in ALIASES else name)
    return 0
