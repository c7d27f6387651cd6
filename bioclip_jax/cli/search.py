"""bioclip-jax search: nearest neighbours in an index that `embed` wrote, by text, image file or id."""

from __future__ import annotations

import os
import sys

from bioclip_jax.cli import common
from bioclip_jax.errors import InputError

FORMATS = {".csv": "csv", ".json": "json", ".txt": "table"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("search", help="nearest neighbours in embed's output, by text, image file or id")
    p.add_argument("index", help="embed's output: a folder of Parquet parts, a .parquet, .npy (+ .ids.csv) or .json")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file as the query (repeatable)")
    p.add_argument("--id", action="append", default=[], help="the row with this id as the query; it is left out "
                                                             "of its own results (repeatable)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--model", help="the model that embedded the index, to encode --text and --image (default: the "
                                   "one the index records; a .npy index records none)")
    p.add_argument("--arch", help="architecture of a bare weights file, e.g. ViT-B-16-quickgelu")
    p.add_argument("--approximate", action="store_true",
                   help="faiss IVF index (pip install 'bioclip_jax[search]'), built once and saved beside the "
                        "index; prints its recall@10 against exact search")
    p.add_argument("--nlist", type=int, help="--approximate: k-means lists (default sqrt(rows))")
    p.add_argument("--nprobe", type=int, help="--approximate: lists scanned per query (default nlist/32, at least 8)")
    p.add_argument("--format", choices=["table", "csv", "json"],
                   help="output format (default: from --output's suffix .csv/.json/.txt, else table)")
    p.add_argument("--output", help="write here instead of standard output")
    p.set_defaults(func=run)


def output_format(args) -> str:
    if args.format:
        return args.format
    if not args.output:
        return "table"
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in FORMATS:
        raise InputError(f"--output {args.output}: the suffix chooses the format; expected one of "
                         f"{', '.join(FORMATS)}, or give --format")
    return FORMATS[suffix]


def run(args) -> int:
    from bioclip_jax.inference import io
    from bioclip_jax.inference.search import describe, format_results, run_search

    fmt = output_format(args)
    output = io.check_output(args.output)
    rows, report = run_search(args.index, args.text, args.image, args.id, args.k, args.model, args.arch,
                              args.approximate, args.nlist, args.nprobe)
    print(describe(report), file=sys.stderr)
    common.emit(format_results(rows, fmt), output)
    return 0
