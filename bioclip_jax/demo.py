"""The quick-start job on the embedded default data: the synthetic tree of life.

1. write the synthetic shards (train / val = new images of training species / heldout = species never trained on),
2. train configs/demo.py (a small CLIP, CPU-sized),
3. zero-shot accuracy at every rank, kingdom -> species, on the val images and on the held-out species,
4. export the model as an open_clip folder, and print a report.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from bioclip_jax.convert.checkpoint import export_open_clip
from bioclip_jax.convert.files import load_model_config
from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife
from bioclip_jax.data.taxonomy import RANKS
from bioclip_jax.evaluate.plots import plot_embeddings
from bioclip_jax.evaluate.zero_shot import embed_eval_set, hierarchy_consistency, per_rank_accuracy
from bioclip_jax.shards import SyntheticTree, make_shards
from bioclip_jax.train.trainer import train


def write_data(data_dir: str, image_size: int, seed: int = 0) -> SyntheticTreeOfLife:
    config = SyntheticConfig(seed=seed, image_size=image_size)
    print(make_shards(SyntheticTree(config), data_dir, records_per_shard=1000).report())
    return SyntheticTreeOfLife(config)


def evaluate_per_rank(model, tree: SyntheticTreeOfLife, val: str, heldout: str, batch_size: int = 256,
                      plot_dir: str | None = None) -> dict:
    """{"val": {rank: metrics}, "heldout_species": {rank: metrics}, "hierarchy_consistency": {rank: fraction}};
    candidates are all species of the tree. With `plot_dir`, PCA plots of the val embeddings by kingdom and phylum."""
    results = {}
    for name, data in (("val", val), ("heldout_species", heldout)):
        if data:
            features, ranks, _, _ = embed_eval_set(model, data, batch_size=batch_size, desc=f"zero-shot {name}")
            results[name] = per_rank_accuracy(model, features, ranks, tree.species)
            if name == "val":
                results["hierarchy_consistency"] = hierarchy_consistency(model, features, tree.species)
                for rank, depth in (("kingdom", 1), ("phylum", 2)) if plot_dir else ():
                    plot_embeddings(features, [" ".join(r[:depth]) for r in ranks],
                                    os.path.join(plot_dir, f"embeddings_by_{rank}.png"),
                                    title=f"val image embeddings (PCA), coloured by {rank}")
    return results


def format_report(results: dict, seconds: float, steps: int, final_loss: float, export_dir: str) -> str:
    lines = [f"trained {steps} steps in {seconds / 60:.1f} min, final loss {final_loss:.3f}",
             "zero-shot top-1 accuracy by rank (chance in brackets):",
             f"  {'rank':<8}" + "".join(f"{name:>26}" for name in results if name != "hierarchy_consistency")
             + "   hierarchy consistency (val)"]
    consistency = results.get("hierarchy_consistency", {})
    for rank in RANKS:
        cells = "".join(f"{100 * r[rank]['top1']:>16.1f}% [{100 * r[rank]['chance']:5.1f}%]"
                        for name, r in results.items() if name != "hierarchy_consistency")
        lines.append(f"  {rank:<8}{cells}" + (f"{100 * consistency[rank]:>20.1f}%" if rank in consistency else ""))
    lines.append(f"open_clip export: {export_dir}  (open_clip.create_model_and_transforms('local-dir:{export_dir}'))")
    return "\n".join(lines)


def run_demo(config: ml_collections.ConfigDict, workdir: str, evaluate_fn=None) -> dict:
    """`evaluate_fn` is the trainer's periodic evaluation (config.eval.every_steps), e.g. the validation metrics."""

    start = time.perf_counter()
    image_size = load_model_config(config.model).vision.image_size
    data_dir = os.path.join(workdir, "data")
    tree = write_data(data_dir, image_size, config.train.seed)
    for split in ("train", "val", "heldout"):
        config.data[split] = os.path.join(data_dir, split)
    result = train(config, workdir, evaluate_fn=evaluate_fn)
    model = result.model()
    results = evaluate_per_rank(model, tree, config.data.val, config.data.heldout, config.eval.batch_size,
                                plot_dir=workdir)
    export_dir = str(export_open_clip(model, os.path.join(workdir, "open_clip")))
    seconds = time.perf_counter() - start
    final_loss = result.history[-1]["loss"] if result.history else float("nan")
    report = {"seconds": seconds, "steps": result.step, "final_loss": final_loss, "zero_shot": results,
              "export": export_dir}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(results, seconds, result.step, final_loss, export_dir))
    return report
