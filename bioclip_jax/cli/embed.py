"""bioclip-jax embed: image embeddings as JSON, pybioclip's embed format."""

from __future__ import annotations

from bioclip_jax.cli import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="image embeddings as JSON (pybioclip's embed format, unnormalised)")
    p.add_argument("image_file", nargs="+", help="input image file(s)")
    common.add_model_options(p, "weights (as for predict)")
    p.add_argument("--output")
    p.add_argument("--batch-size", type=int, default=10)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from bioclip_jax.inference.classify import embed_images
    from bioclip_jax.inference.io import check_output, embeddings_json

    output = check_output(args.output)
    model = common.model(args)
    keys, features, failures = embed_images(model, args.image_file, batch_size=args.batch_size,
                                            preprocess=args.preprocess)
    common.emit(json.dumps(embeddings_json(model.source, keys, features), indent=4) + "\n", output)
    return common.report_failures(failures)
