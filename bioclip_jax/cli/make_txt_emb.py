"""bioclip-jax make-txt-emb: the species text-embedding matrix for tree-of-life prediction."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("make-txt-emb", help="species text-embedding matrix for tree-of-life prediction")
    p.add_argument("taxa", help="CSV with kingdom, phylum, cls, order, family, genus, species[, common_name]; a "
                                "taxon in several rows (e.g. one row per image) is embedded once")
    p.add_argument("--model", required=True)
    p.add_argument("--arch", help="architecture of a bare weights file")
    p.add_argument("--out", required=True, help="folder for txt_emb_species.npy and txt_emb_species.json")
    p.add_argument("--text-type", default="taxon_com", help="name used in the templates (default taxon_com)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.inference.io import read_taxa
    from bioclip_jax.inference.model import load
    from bioclip_jax.inference.tree_of_life import make_txt_emb, unique_taxa

    model = load(args.model, model=args.arch)
    taxa = read_taxa(args.taxa)
    unique = len(unique_taxa(taxa))
    folder = make_txt_emb(model, taxa, args.out, text_type=args.text_type)
    merged = f" ({len(taxa) - unique} repeated rows merged: one column per taxon)" if unique < len(taxa) else ""
    print(f"wrote {unique} species embeddings to {folder}{merged}")
    return 0
