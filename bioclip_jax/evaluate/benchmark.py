"""The paper's evaluation table: zero-shot (and optionally 1-/5-shot) top-1 on the 10 tasks, for whichever task folders
(metadata.csv layout) or TFDS builds are present, written as markdown, CSV and JSON next to the published numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.data.tfds_eval import TASK_FOLDERS, EvalSetSource, FolderEvalSource
from bioclip_jax.evaluate.few_shot import simpleshot
from bioclip_jax.evaluate.zero_shot import embed_eval_set, topk_accuracy
from bioclip_jax.inference.model import Model
from bioclip_jax.inference.templates import TEMPLATE_SETS
from bioclip_jax.inference.zero_shot import class_texts, zero_shot_classifier

log = logging.getLogger(__name__)
TASK_NAMES = {"birds_525": "Birds 525", "plankton": "Plankton", "insects": "Insects", "insects_2": "Insects 2",
              "plantnet": "PlantNet", "fungi": "Fungi", "plantvillage": "PlantVillage",
              "medicinal_leaf": "Med. Leaf", "plantdoc": "PlantDoc", "rare_species": "Rare Species"}
# Zero-shot top-1 of the BioCLIP paper (CVPR 2024, Table 4); per task for BioCLIP, means for CLIP and OpenCLIP.
PUBLISHED_ZERO_SHOT = {
    "BioCLIP (paper)": {"birds_525": 72.1, "plankton": 6.1, "insects": 34.8, "insects_2": 20.4, "plantnet": 91.4,
                        "fungi": 40.7, "plantvillage": 24.4, "medicinal_leaf": 38.6, "plantdoc": 28.4,
                        "rare_species": 37.8, "mean": 39.4},
    "CLIP (paper)": {"mean": 21.4},
    "OpenCLIP (paper)": {"mean": 20.6},
}


def find_tasks(tasks_dir: str | os.PathLike | None, tfds_data_dir: str | os.PathLike | None = None) -> dict:
    """{task: source} for every task present: a folder `tasks_dir/<task folder>/metadata.csv` (or one named like the
    task), or a TFDS build in `tfds_data_dir`. Any other sub-folder with a metadata.csv is a custom task named after
    the folder."""
    found = {}
    used = set()
    for task, folder in TASK_FOLDERS.items():
        if tasks_dir:
            for name in (folder, task):
                if (Path(tasks_dir) / name / "metadata.csv").is_file():
                    found[task] = FolderEvalSource(Path(tasks_dir) / name)
                    used.add(name)
                    break
        if task not in found and tfds_data_dir:
            try:
                found[task] = EvalSetSource(task, tfds_data_dir)
            except FileNotFoundError:
                pass
    if tasks_dir:
        for csv_path in sorted(Path(tasks_dir).glob("*/metadata.csv")):
            if csv_path.parent.name not in used:
                found[csv_path.parent.name] = FolderEvalSource(csv_path.parent)
    return found


def _class_taxa(labels: Sequence[str], ranks: Sequence, commons: Sequence[str]) -> dict[str, Taxon]:
    """The taxon of each class, from the first of its examples that carries ranks."""
    taxa: dict[str, Taxon] = {}
    for label, r, common in zip(labels, ranks, commons):
        taxon = Taxon.from_ranks(r, common)
        if label not in taxa and not taxon.empty:
            taxa[label] = taxon
    return taxa


def evaluate_task(model: Model, source, text_type: str = "taxon_com", templates: str = "openai",
                  shots: Sequence[int] = (), batch_size: int = 64) -> dict:
    features, ranks, labels, commons = embed_eval_set(model, source, batch_size=batch_size, desc="embedding")
    classes = list(source.class_names)
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[label] for label in labels])
    taxa = _class_taxa(labels, ranks, commons) if text_type != "asis" else {}
    # Classes without ranks fall back to their label as given (BioCLIP does the same for datasets without taxonomy).
    names = [class_texts([taxa[c]], text_type)[0] if c in taxa else c for c in classes]
    weights = zero_shot_classifier(model, names, TEMPLATE_SETS[templates])
    result = {"images": len(labels), "classes": len(classes), "text_type": text_type,
              "zero_shot": topk_accuracy(model.logit_scale * features @ weights.T, truth)}
    for k in shots:
        try:
            mean, std = simpleshot(features, truth, k=k)
            result[f"{k}_shot"] = {"mean": mean, "std": std}
        except ValueError as e:  # too few images per class for k: say so, keep the other results
            log.warning("%d-shot skipped: %s", k, e)
            result[f"{k}_shot"] = {"skipped": str(e)}
    return result


def run_benchmark(model: Model, sources: dict, out_dir: str | os.PathLike, model_name: str = "this model",
                  **kwargs) -> dict:
    """Evaluates every task in `sources` and writes results.{json,csv,md} to `out_dir`."""
    if not sources:
        raise FileNotFoundError("no evaluation task found: expected folders such as PLK_Mini/metadata.csv or "
                                "rare_species/metadata.csv, or TFDS builds (bioclip_jax.data.tfds_eval.build)")
    results = {task: evaluate_task(model, source, **kwargs) for task, source in sources.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"model": model_name, "tasks": results}, indent=2) + "\n")
    table = _table(results, model_name)
    with open(out_dir / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(table)
    (out_dir / "results.md").write_text(_markdown(table))
    return results


def _table(results: dict, model_name: str) -> list[list[str]]:
    """Rows: models (ours, then the published ones); columns: tasks present, then their mean. Zero-shot top-1 %."""
    tasks = [t for t in TASK_NAMES if t in results] + sorted(t for t in results if t not in TASK_NAMES)
    ours = [100 * results[t]["zero_shot"]["top1"] for t in tasks]
    rows = [["model", *[TASK_NAMES.get(t, t) for t in tasks], "mean"],
            [model_name, *[f"{v:.1f}" for v in ours], f"{np.mean(ours):.1f}"]]
    for name, numbers in PUBLISHED_ZERO_SHOT.items():
        cells = [f"{numbers[t]:.1f}" if t in numbers else "" for t in tasks]
        mean = f"{numbers['mean']:.1f} (10 tasks)" if "mean" in numbers else ""
        rows.append([name, *cells, mean])
    return rows


def _markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "Zero-shot top-1 accuracy (%)\n\n" + "\n".join(lines) + "\n"
