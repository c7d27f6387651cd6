"""bioclip-jax eval: the paper's zero-shot and few-shot table on the tasks present."""

from __future__ import annotations

from bioclip_jax.cli import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="the paper's table: zero-shot (and k-shot) top-1 on the tasks present")
    p.add_argument("--model", required=True)
    p.add_argument("--arch", help="architecture of a bare weights file")
    p.add_argument("--tasks", help="folder holding task folders as published (PLK_Mini/, kaggle_bird/, rare_species/, "
                                   "rare-species/ from Hugging Face, ...)")
    p.add_argument("--tfds-data-dir", help="TFDS data_dir with bioclip_eval builds")
    p.add_argument("--only", help="comma-separated task names to run (default: all present)")
    p.add_argument("--text-type", default="taxon_com", choices=["asis", "sci", "com", "taxon", "sci_com", "taxon_com"],
                   help="class names by BioCLIP's naming_eval; classes with the same name merge")
    p.add_argument("--templates", choices=["bioclip", "openai", "single"], default="bioclip",
                   help="bioclip: BioCLIP's 81 (OpenAI's 80 + 'a photo of {}.'); openai: the 80")
    p.add_argument("--shots", default="", help="few-shot k values in the order run, e.g. 1,5 (SimpleShot)")
    p.add_argument("--few-shot-sampling", choices=["bioclip", "independent"], default="bioclip",
                   help="bioclip: BioCLIP's seeded in-place shuffles carried across folds and k; independent: a "
                        "fresh draw per fold")
    p.add_argument("--folds", type=int, default=5, help="few-shot folds (fold i seeded with i)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--name", help="model name in the table")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the params over the devices instead of a copy on each (models too large for one)")
    p.add_argument("--out", required=True, help="results.md, results.csv and results.json go here (by process 0)")
    common.add_distributed_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import jax

    from bioclip_jax.evaluate.benchmark import find_tasks, run_benchmark
    from bioclip_jax.inference.encoder import mesh_encoder
    from bioclip_jax.inference.model import load

    common.initialize_distributed(args)
    # Every device of every host encodes: each host its share of a task's images, the class texts split over all.
    model = mesh_encoder(load(args.model, model=args.arch), fsdp=args.fsdp)
    sources = find_tasks(args.tasks, args.tfds_data_dir)
    if args.only:
        sources = {t: s for t, s in sources.items() if t in args.only.split(",")}
    shots = [int(k) for k in args.shots.split(",") if k] if args.shots else []
    run_benchmark(model, sources, args.out, model_name=args.name or str(args.model), text_type=args.text_type,
                  templates=args.templates, shots=shots, batch_size=args.batch_size,
                  few_shot_sampling=args.few_shot_sampling, folds=args.folds)
    if jax.process_index() == 0:
        print((Path(args.out) / "results.md").read_text())
    return 0
