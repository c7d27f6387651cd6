"""bioclip-jax predict: pybioclip's predict (tree of life, custom labels or label bins), with its --log."""

from __future__ import annotations

from bioclip_jax.cli import common, embed
from bioclip_jax.errors import InputError

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify images: the tree of life (default), custom labels or label "
                                              "bins (pybioclip's predict)")
    p.add_argument("image_file", nargs="+", help=embed.INPUT_HELP)
    common.add_model_options(p, "weights: open_clip folder/file, bioclip_jax folder or run, transformers CLIP "
                                "folder, hf-hub:ORG/NAME, bioclip or bioclip-2")
    # pybioclip's group: one mode at most, refused while parsing with argparse's "not allowed with" message.
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", choices=RANKS, help="tree-of-life prediction at this rank (default: species); "
                                                     "not allowed with --cls, --bins or --subset")
    group.add_argument("--cls", help="labels: comma-separated, or a file with one label per line; not allowed with "
                                     "--rank, --bins or --subset")
    group.add_argument("--bins", help="CSV with a header row, then label,bin rows: a bin's score sums its labels' "
                                      "probabilities; not allowed with --rank, --cls or --subset")
    group.add_argument("--subset", help="CSV whose first column's header names a rank and whose rows the taxa to "
                                        "keep (binomials at species rank): tree of life at species rank among them; "
                                        "not allowed with --rank, --cls or --bins")
    group.add_argument("--probe", help="a linear probe written by `finetune --method probe` (probe.json, or the model "
                                       "folder holding it): its classes, scored from the image embeddings")
    p.add_argument("--txt-emb", help="folder with txt_emb_species.npy/.json (pybioclip format) for the tree of life; "
                                     "default for bioclip / bioclip-2: the TreeOfLife embeddings on the hub")
    p.add_argument("--min-prob", type=float, default=1e-9, help="species below this are not summed, for --rank")
    p.add_argument("--k", type=int, help="predictions per image (default: 5 for the tree of life, all labels for "
                                         "--cls/--bins)")
    p.add_argument("--format", choices=["table", "csv"], default="csv", help="format of the output (default: csv)")
    p.add_argument("--output", help="write here instead of standard output: OUT.parquet is a folder of part files "
                                    "(resumable, multi-host, carried columns, top-k on the device); any other name "
                                    "gets --format (pybioclip's)")
    p.add_argument("--batch-size", type=int, default=10)
    embed.add_scale_options(p)
    p.add_argument("--log", metavar="LOG_FILE", help="record the run (model, settings, images): a new JSON file if "
                                                     "the name ends in .json, else text appended (pybioclip's logs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.inference import io, recorder

    tree_of_life = not (args.cls or args.bins or args.probe)
    if tree_of_life and not args.txt_emb:
        check_tree_of_life_model(args)
    output = io.check_output(args.output)
    scale = bool(output) and output.rstrip("/").lower().endswith(".parquet")
    if output and not scale and output.lower().endswith((".json", ".npy")):
        raise InputError(f"--output {output}: predict writes .parquet (parts) or --format {args.format} text; "
                         f"name the file .parquet, .csv or .txt")
    if args.log:
        if scale:
            raise InputError("--log records pybioclip-style runs; it is not allowed with --output .parquet")
        recorder.verify_recorder_path(args.log)
    if args.probe and scale:
        raise InputError("--probe scores images on the host; it is not allowed with --output .parquet (use .csv)")
    common.initialize_distributed(args)
    inputs = embed._collect(args.image_file)
    classifier = _probe(args) if args.probe else _custom_labels(args) if not tree_of_life else _tree_of_life(args)
    if scale:
        return _predict_parts(classifier, inputs, output, args, tree_of_life)
    images = _paths_only(inputs)
    if args.log:
        recorder.attach_cli_recorder(classifier, cls=args.cls, bins_path=args.bins, subset=args.subset)
    if tree_of_life:
        rows = classifier.predict(images, rank=args.rank or "species", min_prob=args.min_prob,
                                  k=args.k or 5, batch_size=args.batch_size)
    else:
        rows = classifier.predict(images, k=args.k, batch_size=args.batch_size)
    if args.log:
        recorder.save_recorded_predictions(classifier, args.log)
    common.emit(io.format_rows(rows, args.format), output)
    return common.report_failures(classifier.failures)


def _predict_parts(classifier, inputs, output: str, args, tree_of_life: bool) -> int:
    import sys

    from bioclip_jax.inference.jobs import describe
    from bioclip_jax.inference.predict_job import predict_job

    summary = predict_job(classifier, inputs, output, rank=(args.rank or "species") if tree_of_life else "species",
                          k=args.k, min_prob=args.min_prob, batch_size=args.batch_size, part_size=args.part_size,
                          progress=not args.quiet)
    print(f"bioclip-jax predict: {describe(summary)}", file=sys.stderr)
    return embed.report(summary.failures, summary.failures_file)


def _paths_only(inputs) -> list[str]:
    """pybioclip's outputs name each image by its path; shard records have none."""
    if inputs.shard_paths:
        raise InputError(f"{inputs.shard_paths[0]}: shard records are predicted into parts: use --output "
                         "OUT.parquet")
    return list(inputs.refs)


def check_tree_of_life_model(args) -> None:
    """pybioclip's parse-time errors: its species embeddings exist for its hub models only, and not for other
    weights. With --txt-emb any model and weights predict over the tree of life."""
    from bioclip_jax.inference.classify import ensure_tol_supported_model

    if args.pretrained:
        raise InputError("Custom checkpoints are currently not supported for TreeOfLife prediction")
    ensure_tol_supported_model(args.model)


def _probe(args):
    """--probe: a fine-tune's linear probe over the embeddings of the model it was fitted on: --model, or by default
    the model folder the probe lies in (`predict --probe OUT/model IMAGES`)."""
    import os

    from bioclip_jax.inference.probe import ProbeClassifier

    if args.model == common.PYBIOCLIP_MODEL and not args.pretrained and os.path.isdir(args.probe):
        args.model = args.probe
    return ProbeClassifier(args.probe, **common.classifier_model(args), preprocess=args.preprocess)


def _custom_labels(args):
    """--cls or --bins; the label files are read before the model loads, so their errors come first."""
    from bioclip_jax.inference import io
    from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier

    if args.bins:
        bins = io.read_bins(args.bins)
        return CustomLabelsBinningClassifier(bins, **common.classifier_model(args), preprocess=args.preprocess)
    with common.warnings_as_lines(args.command):
        labels = io.read_labels(args.cls)
    return CustomLabelsClassifier(labels, **common.classifier_model(args), preprocess=args.preprocess)


def _tree_of_life(args):
    """pybioclip: no mode (or --subset) is the tree of life at species rank, 5 per image."""
    from bioclip_jax.inference import io
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier

    if args.subset:
        io.read_subset(args.subset)  # its errors before the model loads
    classifier = TreeOfLifeClassifier(**common.classifier_model(args), txt_emb=args.txt_emb,
                                      preprocess=args.preprocess)
    if args.subset:
        try:
            keep = classifier.create_taxa_filter_from_csv(args.subset)
        except ValueError as e:  # pybioclip's message ("Unknown species received: ..."), and the file it came from
            raise InputError(f"{args.subset}: {e}") from e
        classifier.apply_filter(keep)
    return classifier
