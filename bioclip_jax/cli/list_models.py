"""bioclip-jax list-models: pybioclip's list-models (hub names, then open_clip's architectures and their tags), and
our own architectures with --architectures.

open_clip is optional (a test extra): without it the hub names are followed by our own architectures, with a note on
standard error, and --model has no tags to show."""

from __future__ import annotations

import sys

NO_OPEN_CLIP = "open_clip is not installed (pip install open_clip_torch): "


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "list-models", help="the hub models and the architectures open_clip knows (pybioclip's list-models)",
        description="As pybioclip: the BioCLIP hub models, then every architecture known to open_clip, each on a line "
                    "after a tab; any name bioclip_jax.load reads (a folder, a weights file, hf-hub:ORG/NAME) also "
                    "works as --model in embed and predict.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", help="list the pretrained tags open_clip knows for this model")
    group.add_argument("--architectures", action="store_true",
                       help="list bioclip_jax's own architectures (and aliases) instead; needs no open_clip")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.inference.classify import TOL_MODELS

    if args.architectures:
        _print_architectures()
        return 0
    try:
        import open_clip
    except ImportError:
        open_clip = None
    if args.model:
        if open_clip is None:
            print(f"bioclip-jax list-models: {NO_OPEN_CLIP}it holds the pretrained tags", file=sys.stderr)
            return 1
        for tag in open_clip.list_pretrained_tags_by_model(args.model):
            print(tag)
        return 0
    if open_clip is None:
        print(f"bioclip-jax list-models: {NO_OPEN_CLIP}listing bioclip_jax's own architectures", file=sys.stderr)
    from bioclip_jax.models.config import list_models

    for name in [*TOL_MODELS, *(open_clip.list_models() if open_clip else list_models())]:
        print(f"\t{name}")
    return 0


def _print_architectures() -> None:
    from bioclip_jax.models.config import ALIASES, list_models

    for name in list_models():
        print(f"{name} -> {ALIASES[name]}" if name in ALIASES else name)
