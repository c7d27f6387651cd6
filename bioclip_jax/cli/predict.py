"""bioclip-jax predict: pybioclip's predict (tree of life, custom labels or label bins)."""

from __future__ import annotations

from bioclip_jax.cli import common
from bioclip_jax.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify images: the tree of life (default), custom labels or label "
                                              "bins (pybioclip's predict)")
    p.add_argument("images", nargs="+")
    common.add_model_options(p, "weights: open_clip folder/file, bioclip_jax folder or run, transformers CLIP "
                                "folder, hf-hub:ORG/NAME, bioclip or bioclip-2")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", choices=["kingdom", "phylum", "class", "order", "family", "genus", "species"],
                       help="tree-of-life prediction at this rank (the default mode, at species rank)")
    group.add_argument("--cls", help="labels: comma-separated, or a file with one label per line")
    group.add_argument("--bins", help="CSV with a header row, then label,bin rows: a bin's score sums its labels' "
                                      "probabilities")
    p.add_argument("--txt-emb", help="folder with txt_emb_species.npy/.json (pybioclip format) for the tree of life; "
                                     "default for bioclip / bioclip-2: the TreeOfLife embeddings on the hub")
    p.add_argument("--subset", help="CSV whose first column's header names a rank and whose rows the taxa to keep "
                                    "(binomials at species rank); alone it means species rank")
    p.add_argument("--min-prob", type=float, default=1e-9, help="species below this are not summed, for --rank")
    p.add_argument("--k", type=int, help="predictions per image (default: 5 for the tree of life, all labels for "
                                         "--cls/--bins)")
    p.add_argument("--format", choices=["csv", "table"], default="csv")
    p.add_argument("--output", help="write here instead of standard output")
    p.add_argument("--batch-size", type=int, default=10)
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.inference import io

    output = io.check_output(args.output)
    if args.cls or args.bins:
        classifier, rows = _custom_labels(args)
    else:
        classifier, rows = _tree_of_life(args)
    common.emit(io.format_rows(rows, args.format), output)
    return common.report_failures(classifier.failures)


def _custom_labels(args):
    """--cls or --bins; the label files are read before the model loads, so their errors come first."""
    from bioclip_jax.inference import io
    from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier

    if args.subset:
        raise InputError("--subset restricts the tree of life; it cannot be combined with --cls or --bins")
    if args.bins:
        bins = io.read_bins(args.bins)
        classifier = CustomLabelsBinningClassifier(bins, model_str=common.model(args), preprocess=args.preprocess)
    else:
        with common.warnings_as_lines(args.command):
            labels = io.read_labels(args.cls)
        classifier = CustomLabelsClassifier(labels, model_str=common.model(args), preprocess=args.preprocess)
    return classifier, classifier.predict(args.images, k=args.k, batch_size=args.batch_size)


def _tree_of_life(args):
    """pybioclip: no mode (or --subset alone) is the tree of life at species rank, 5 per image."""
    from bioclip_jax.inference import io
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier

    if args.subset:
        io.read_subset(args.subset)  # its errors before the model loads
    classifier = TreeOfLifeClassifier(common.model(args), txt_emb=args.txt_emb, preprocess=args.preprocess)
    if args.subset:
        classifier.apply_filter(classifier.create_taxa_filter_from_csv(args.subset))
    rows = classifier.predict(args.images, rank=args.rank or "species", min_prob=args.min_prob, k=args.k or 5,
                              batch_size=args.batch_size)
    return classifier, rows
