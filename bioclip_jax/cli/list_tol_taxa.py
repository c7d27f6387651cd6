"""bioclip-jax list-tol-taxa: pybioclip's list-tol-taxa."""

from __future__ import annotations

import sys

from bioclip_jax.cli.common import PYBIOCLIP_MODEL


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list-tol-taxa", help="the species of the tree-of-life embeddings as CSV (pybioclip's "
                                                    "list-tol-taxa)")
    p.add_argument("--model", default=PYBIOCLIP_MODEL, help=f"bioclip or bioclip-2 (default {PYBIOCLIP_MODEL})")
    p.add_argument("--txt-emb", help="folder with txt_emb_species.npy/.json instead of the model's")
    p.set_defaults(func=run)


def run(args) -> int:
    """Every species of the tree-of-life embeddings as CSV."""
    from bioclip_jax.convert.hub import resolve_txt_emb
    from bioclip_jax.inference.classify import ensure_tol_supported_model
    from bioclip_jax.inference.io import format_rows
    from bioclip_jax.inference.tree_of_life import SPECIES_COLUMNS, label_data, read_txt_names

    if not args.txt_emb:
        ensure_tol_supported_model(args.model)  # pybioclip's ValueError for models without published embeddings
    names = read_txt_names(args.txt_emb or resolve_txt_emb(args.model))
    sys.stdout.write(format_rows(label_data(names), "csv", columns=SPECIES_COLUMNS))
    return 0
