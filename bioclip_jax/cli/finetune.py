"""bioclip-jax finetune: a folder of class subfolders (or a CSV) -> a fine-tuned model, results.md before/after."""

from __future__ import annotations

import sys

from bioclip_jax.cli import common

METHODS = ("full", "vision", "lora", "probe")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune BioCLIP (or any CLIP) on your labelled images: a folder of class subfolders or "
                         "a CSV -> OUT/model (open_clip, pybioclip) and OUT/results.md",
        description="Methods: full (the whole CLIP), vision (text tower frozen), lora (low-rank adapters on attention "
                    "and MLP weights, merged on export), probe (logistic regression on frozen embeddings; "
                    "`predict --probe OUT/model`). Batch, accumulation, remat and steps are chosen from the device "
                    "and the data; config overrides --config.KEY=VALUE (configs/finetune.py) apply last. Rerunning "
                    "the same command resumes; a finished OUT is never written over.")
    p.add_argument("data", help="a folder of class subfolders (Pica hudsonia/1.jpg), or a CSV with filepath and a "
                                "class column and/or kingdom..species columns (common_name, split optional)")
    p.add_argument("--out", required=True, help="output folder: split.csv, shards/, train/, model/, results.md")
    p.add_argument("--start", default="bioclip", help="weights to start from: bioclip, bioclip-2, hf-hub:ORG/NAME, "
                                                       "an open_clip or bioclip_jax folder or file (default bioclip)")
    p.add_argument("--arch", help="architecture of a bare weights file, e.g. ViT-B-16-quickgelu")
    p.add_argument("--method", choices=METHODS, default="full", help="default: full")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of each class held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=0.0,
                   help="default: 10 under 10K images (at least 300 steps, at most 30 "
                        "epochs), 5 under 100K, else 2")
    p.add_argument("--steps", type=int, default=0, help="steps instead of epochs")
    p.add_argument("--batch-size", type=int, default=0,
                   help="global batch (default: what the device's memory holds, at most 256 and a tenth of the "
                        "training images, at least 32)")
    p.add_argument("--lr", type=float, default=0.0, help="default 1e-5 (full, vision), 1e-4 (lora)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--templates", choices=["openai", "bioclip", "single"], default="openai",
                   help="prompts of the zero-shot evaluation (default openai: pybioclip's CustomLabelsClassifier)")
    p.add_argument("--retention", metavar="SHARDS", help="shards of other species (with ranks): zero-shot species "
                                                         "accuracy before and after, what the fine-tune must keep")
    p.add_argument("--replay", metavar="SHARDS", help="shards of other taxa or image-text pairs mixed into every "
                                                      "batch (config.replay.data), to keep what the start model knows")
    p.add_argument("--replay-per-batch", type=int, default=0,
                   help="replay rows added to each batch (default: as many as the batch's own)")
    p.add_argument("--wise-alpha", type=float, default=None,
                   help="WiSE-FT: export (1 - alpha) x start + alpha x fine-tuned weights (default: 1, plain "
                        "fine-tuning, with --replay; 0.5 without)")
    p.add_argument("--workers", type=int, help="processes that make the shards (default: up to 4)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bioclip_jax.train.finetune import Options, finetune

    common.setup_logging()
    overrides = [o[len("--config."):] for o in args.overrides if o.startswith("--config.")]
    unknown = [o for o in args.overrides if not o.startswith("--config.")]
    if unknown:
        from bioclip_jax.errors import InputError

        raise InputError(f"unrecognised arguments {unknown}; config overrides look like --config.train.lr=3e-4")
    options = Options(start=args.start, method=args.method, arch=args.arch, heldout_fraction=args.heldout,
                      seed=args.seed, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      lora_rank=args.lora_rank, templates=args.templates, retention=args.retention,
                      replay=args.replay, replay_per_batch=args.replay_per_batch, overrides=tuple(overrides),
                      wise_alpha=args.wise_alpha)
    with common.warnings_as_lines(args.command):
        result = finetune(args.data, args.out, options, workers=args.workers)
    sys.stdout.write(result.report)
    print(f"model: {result.model_dir}  (open_clip 'local-dir:{result.model_dir}', pybioclip, bioclip_jax.load)")
    return 0
