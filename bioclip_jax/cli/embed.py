"""bioclip-jax embed: image embeddings of files, folders, globs, listings or shards, as Parquet parts (resumable,
multi-host), .npy, CSV or pybioclip's JSON."""

from __future__ import annotations

import sys

from bioclip_jax.cli import common

INPUT_HELP = ("images: files, folders (recursive), quoted globs ('photos/**/*.jpg'), listings (.txt one path per "
              "line; .csv/.parquet with a path column: path, file_path, filepath, image_path, img_path, file_name, "
              "filename or image; other columns are carried to the output; uuid or id names the rows), "
              "make-shards' .array_record shards or folders of them, gs:// prefixes")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="image embeddings: Parquet parts (emb-explorer's layout), .npy, .csv or "
                                            "pybioclip's JSON")
    p.add_argument("image_file", nargs="+", help=INPUT_HELP)
    common.add_model_options(p, "weights (as for predict)")
    p.add_argument("--output", help="OUT.parquet (a folder of part files, resumable: rerun the same command after an "
                                    "interruption), OUT.npy (+ OUT.ids.csv), OUT.csv or OUT.json (pybioclip's); "
                                    "local or gs://. Default: pybioclip's JSON on standard output")
    p.add_argument("--batch-size", type=int, default=10)
    add_scale_options(p)
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--raw", action="store_true", help="unnormalised features (default for .json and standard "
                                                         "output, as pybioclip)")
    norm.add_argument("--normalized", action="store_true", help="unit-length features (default for .parquet, .npy "
                                                                "and .csv)")
    p.add_argument("--float16", action="store_true", help="store the embeddings as float16 (half the size)")
    p.set_defaults(func=run)


def add_scale_options(p) -> None:
    """What embed and predict share for large jobs: parts, progress and hosts."""
    p.add_argument("--part-size", type=int, default=8192, help="images per part file (default 8192): the unit of "
                                                               "resume and of the hosts' shares")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_distributed_options(p)


def run(args) -> int:
    from bioclip_jax.inference.io import check_output
    from bioclip_jax.inference.jobs import describe, embed_job
    from bioclip_jax.inference.outputs import FORMATS, output_format

    output = check_output(args.output, FORMATS)  # refused before the model loads
    fmt = output_format(output) if output else ".json"
    common.initialize_distributed(args)
    inputs = _collect(args.image_file)
    model = common.model(args)
    normalize = args.normalized or (not args.raw and fmt != ".json")
    if output is None:
        return _to_stdout(model, inputs, args, normalize)
    summary = embed_job(model, inputs, output, batch_size=args.batch_size, part_size=args.part_size,
                        preprocess=args.preprocess, normalize=normalize, float16=args.float16,
                        progress=not args.quiet)
    print(f"bioclip-jax embed: {describe(summary)}", file=sys.stderr)
    return report(summary.failures, summary.failures_file)


def _collect(specs):
    from bioclip_jax.inference.inputs import collect_inputs

    return collect_inputs(specs)


def _to_stdout(model, inputs, args, normalize: bool) -> int:
    """pybioclip's embed without --output: the JSON document on standard output (built in a temporary folder)."""
    import pathlib
    import tempfile

    from bioclip_jax.inference.jobs import embed_job

    with tempfile.TemporaryDirectory() as tmp:
        target = pathlib.Path(tmp) / "embeddings.json"
        summary = embed_job(model, inputs, str(target), batch_size=args.batch_size, part_size=args.part_size,
                            preprocess=args.preprocess, normalize=normalize, float16=args.float16,
                            progress=not args.quiet)
        if target.exists():
            sys.stdout.write(target.read_text())
        return report(summary.failures, None)


def report(failures: dict[str, str], failures_file: str | None, shown: int = 20) -> int:
    """Each unreadable input on standard error (the first `shown`, then where the full list is); exit 1 if any."""
    for name, why in list(failures.items())[:shown]:
        print(f"bioclip-jax: skipped {name}: {why}", file=sys.stderr)
    if len(failures) > shown:
        print(f"bioclip-jax: ... and {len(failures) - shown} more" + (f", all listed in {failures_file}"
                                                                    if failures_file else ""), file=sys.stderr)
    return 1 if failures else 0
