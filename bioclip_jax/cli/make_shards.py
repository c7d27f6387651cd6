"""bioclip-jax make-shards: images -> ArrayRecord shards (docs/data_format.md), one sub-command per source."""

from __future__ import annotations

import argparse
import sys

# Kept here, not imported from shards.beam: parsing imports neither Beam nor jax (tests/test_cli.py).
RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "PrismRunner")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("make-shards", help="images -> ArrayRecord shards of records (docs/data_format.md)",
                              description="Writes OUT/<split>/<split>-NNNNN-of-NNNNN.array_record and "
                                          "OUT/<split>/summary.json. Resumable: rerun the same command to finish an "
                                          "interrupted run.")
    by_source = p.add_subparsers(dest="source", required=True)
    tol = by_source.add_parser("treeoflife", help="TreeOfLife-10M webdataset tars")
    tol.add_argument("inputs", nargs="+",
                     help="tar files, folders, globs or brace patterns ('shard-{000000..000003}.tar')")
    folder = by_source.add_parser("folder", help="an image folder described by BioCLIP's metadata.csv")
    folder.add_argument("csv", help="metadata.csv (columns filepath, class; optional kingdom..species, common_name) "
                                    "or its folder")
    synthetic = by_source.add_parser("synthetic",
                                     help="the synthetic tree of life (train/val of seen species, heldout)")
    synthetic.add_argument("--n-species", type=int, default=200)
    synthetic.add_argument("--images-per-species", type=int, default=20)
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--heldout-fraction", type=float, default=0.1)
    synthetic.add_argument("--val-per-species", type=int, default=2, help="images of every seen species in val")
    tol10m = by_source.add_parser("tol10m", help="TreeOfLife-10M as published: image_set_NN.tar.gz + catalog",
                                  description="Joins tar members <treeoflife_id>.jpg to catalog rows; the split is "
                                              "the catalog's.")
    tol10m.add_argument("--catalog", required=True,
                        help="metadata/catalog.csv, or a .parquet catalog with the same columns")
    tol10m.add_argument("--images", nargs="+", required=True,
                        help="the image tars (.tar.gz or .tar): files, folders, globs or brace patterns "
                             "('dataset/EOL/image_set_*.tar.gz')")
    tol200m = by_source.add_parser(
        "tol200m", help="TreeOfLife-200M: catalog.parquet + the images fetched from its providers (Parquet)",
        description="Joins the image files' uuid to catalog.parquet's; every record goes to train, shuffled across "
                    "taxa by a hash of (seed, uuid). Runs on the local process pool, or on Apache Beam with --runner "
                    "(options after -- go to the Beam runner, e.g. -- --project P --region R --temp_location gs://T).")
    tol200m.add_argument("--catalog", required=True, help="dataset/catalog.parquet (local or gs://)")
    tol200m.add_argument("--images", nargs="+", required=True,
                         help="image Parquet files (uuid, image[, resized_size]) as distributed-downloader writes "
                              "them: files, folders, globs ('images/server=*/*.parquet'), local or gs://")
    tol200m.add_argument("--runner", choices=RUNNERS,
                         help="run on Apache Beam with this runner (default: the local process pool)")
    tol200m.add_argument("beam_args", nargs=argparse.REMAINDER,
                         help="after --: Beam pipeline options, passed through to the runner")
    for q, per_shard, workers in ((tol, 10000, None), (folder, 10000, None), (synthetic, 1000, 1),
                                  (tol10m, 10000, None), (tol200m, 10000, None)):
        _add_output_options(q, per_shard, workers, split=q in (tol, folder), seed=q not in (tol10m,))
    p.set_defaults(func=run)


def _add_output_options(q, per_shard: int, workers: int | None, split: bool, seed: bool) -> None:
    """The options every source shares: where, how many records per shard, the image encoding, the processes."""
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--records-per-shard", type=int, default=per_shard)
    if split:
        q.add_argument("--val-fraction", type=float, default=0.05, help="share of ids in val (0: no val)")
    if seed:
        q.add_argument("--seed", type=int, default=0, help="train/val assignment (synthetic: also the generator)")
    q.add_argument("--resize", type=int, help="squash every image to RESIZE x RESIZE (bicubic), e.g. 224")
    q.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    q.add_argument("--workers", type=int, default=workers,
                   help="processes (default: min(4, CPUs); synthetic: 1, its generator is sequential)")
    q.add_argument("--prefix", help="shard file prefix (default: the split name)")


def run(args) -> int:
    from bioclip_jax import shards

    if args.source == "tol200m":
        return _run_tol200m(args)
    if args.source == "treeoflife":
        source = shards.TreeOfLifeTars(args.inputs, val_fraction=args.val_fraction, seed=args.seed)
    elif args.source == "tol10m":
        source = shards.TreeOfLife10M(args.catalog, args.images)
    elif args.source == "folder":
        source = shards.MetadataFolder(args.csv, val_fraction=args.val_fraction, seed=args.seed)
    else:
        from bioclip_jax.data.synthetic import SyntheticConfig

        config = SyntheticConfig(seed=args.seed, n_species=args.n_species,
                                 images_per_species=args.images_per_species, image_size=args.image_size,
                                 heldout_fraction=args.heldout_fraction)
        source = shards.SyntheticTree(config, val_per_species=args.val_per_species)
    try:
        summary = shards.make_shards(source, args.out, records_per_shard=args.records_per_shard, resize=args.resize,
                                     quality=args.quality, workers=args.workers, prefix=args.prefix)
    except KeyboardInterrupt:  # finished shards are kept: say how to go on rather than print a traceback
        print(f"\nbioclip-jax make-shards: interrupted; rerun the same command to finish {args.out}", file=sys.stderr)
        return 130
    print(summary.report())
    return 0


def _run_tol200m(args) -> int:
    from bioclip_jax import shards

    beam_args = args.beam_args[1:] if args.beam_args[:1] == ["--"] else args.beam_args
    if beam_args and not args.runner:
        print(f"bioclip-jax make-shards: Beam options {' '.join(beam_args)} need --runner", file=sys.stderr)
        return 2
    try:
        if args.runner:
            from bioclip_jax.shards.beam import make_shards_beam

            summary = make_shards_beam(args.catalog, args.images, args.out, runner=args.runner,
                                       pipeline_args=beam_args, records_per_shard=args.records_per_shard,
                                       resize=args.resize, quality=args.quality, seed=args.seed, prefix=args.prefix)
        else:
            source = shards.TreeOfLife200M(args.catalog, args.images, records_per_shard=args.records_per_shard,
                                           seed=args.seed)
            summary = shards.make_shards(source, args.out, resize=args.resize, quality=args.quality,
                                         workers=args.workers, prefix=args.prefix)
    except KeyboardInterrupt:
        print(f"\nbioclip-jax make-shards: interrupted; rerun the same command to finish {args.out}", file=sys.stderr)
        return 130
    print(summary.report())
    return 0
