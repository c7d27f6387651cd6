"""bioclip-jax convert: open_clip <-> bioclip_jax weights, or to transformers."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="open_clip <-> bioclip_jax weights (direction from SRC's format), or to transformers",
        description="SRC in open_clip format (folder with open_clip_config.json, .safetensors, .bin/.pt), a "
                    "transformers CLIP folder or a hub name (hf-hub:ORG/NAME, bioclip, bioclip-2) becomes a "
                    "bioclip_jax model folder; a bioclip_jax folder becomes an open_clip folder "
                    "(open_clip_config.json, .safetensors, .bin). --to picks the format instead.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["bioclip_jax", "open_clip", "transformers"],
                   help="format to write (default: the other side of SRC's format); transformers writes a "
                        "CLIPModel folder with tokenizer and image processor files")
    p.add_argument("--model", help="architecture for bare weight files, e.g. ViT-B-16-quickgelu (BioCLIP)")
    p.add_argument("--no-bin", action="store_true", help="write only safetensors (no torch needed)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.convert.checkpoint import convert_checkpoint

    written, folder = convert_checkpoint(args.src, args.dst, model=args.model,
                                         write_bin=False if args.no_bin else None, to=args.to)
    print(f"wrote {written} model folder {folder}")
    return 0
