"""The paper's evaluation table with BioCLIP's own protocol: zero-shot top-1/3/5, mean per-class top-1 and 1-/5-shot
on the tasks present (task folders as published, read by `bioclip_jax.data.eval_sets`, or TFDS builds), written as
markdown, CSV and JSON next to the published numbers (only under tasks of the published class count).

As BioCLIP's evaluation (Imageomics/bioclip src/evaluation): every image gets its class name by `naming_eval`
(`EvalRow.eval_name`), classes whose names coincide MERGE (the class list is the distinct names in order of first
appearance, pandas' `unique()`, and each image's label is its name's position), prompts are the 81 templates,
and few-shot runs on the task's `class` column (BioCLIP's few_shot.py reads the CSV with text type asis, so merging
never touches it) with its in-place shuffled sampling.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from bioclip_jax import paths
from bioclip_jax.data.eval_sets import TASK_FOLDERS, EvalRow, FolderEvalSource, find_task_csv, first_appearance
from bioclip_jax.data.taxonomy import EVAL_TEXT_TYPES
from bioclip_jax.errors import InputError
from bioclip_jax.evaluate.few_shot import few_shot
from bioclip_jax.evaluate.zero_shot import embed_eval_set, topk_accuracy
from bioclip_jax.inference.encoder import Encoder
from bioclip_jax.inference.templates import TEMPLATE_SETS
from bioclip_jax.inference.zero_shot import zero_shot_classifier

log = logging.getLogger(__name__)
TASK_NAMES = {"birds_525": "Birds 525", "plankton": "Plankton", "insects": "Insects", "insects_2": "Insects 2",
              "plantnet": "PlantNet", "fungi": "Fungi", "plantvillage": "PlantVillage",
              "medicinal_leaf": "Med. Leaf", "plantdoc": "PlantDoc", "rare_species": "Rare Species"}
_PAPER = "BioCLIP paper, CVPR 2024"
_OLD_CARD = "older BioCLIP model card (Imageomics/bioclip repo)"
_RARE_CARD = "Rare Species dataset card (huggingface.co/datasets/imageomics/rare-species)"
# Published rows: (metric, model, source, {task: %}, published mean over the 10 tasks or None). Sources disagree
# (REFERENCE.md section 7), so each row says where it comes from.
PUBLISHED = [
    ("zero-shot top-1", "BioCLIP", _PAPER,
     {"birds_525": 72.1, "plankton": 6.1, "insects": 34.8, "insects_2": 20.4, "plantnet": 91.4, "fungi": 40.7,
      "plantvillage": 24.4, "medicinal_leaf": 38.6, "plantdoc": 28.4, "rare_species": 37.8}, 39.4),
    ("zero-shot top-1", "CLIP", _PAPER, {}, 21.4),
    ("zero-shot top-1", "OpenCLIP", _PAPER, {}, 20.6),
    ("zero-shot top-1", "BioCLIP", _OLD_CARD,
     {"birds_525": 74.7, "plankton": 5.4, "insects": 32.7, "insects_2": 21.2, "plantnet": 91.0, "fungi": 51.8,
      "plantvillage": 24.0, "medicinal_leaf": 48.1, "plantdoc": 27.5, "rare_species": 39.2}, None),
    ("zero-shot top-1", "BioCLIP", _RARE_CARD, {"rare_species": 38.09}, None),
    ("zero-shot top-1", "CLIP", _RARE_CARD, {"rare_species": 31.81}, None),
    ("zero-shot top-1", "OpenCLIP", _RARE_CARD, {"rare_species": 29.85}, None),
    ("1-shot top-1", "BioCLIP", _RARE_CARD, {"rare_species": 44.9}, None),
    ("1-shot top-1", "CLIP", _RARE_CARD, {"rare_species": 28.52}, None),
    ("1-shot top-1", "OpenCLIP", _RARE_CARD, {"rare_species": 29.26}, None),
    ("5-shot top-1", "BioCLIP", _RARE_CARD, {"rare_species": 65.7}, None),
    ("5-shot top-1", "CLIP", _RARE_CARD, {"rare_species": 46.07}, None),
    ("5-shot top-1", "OpenCLIP", _RARE_CARD, {"rare_species": 47.45}, None),
]


# The published tasks' class counts (REFERENCE: the paper's table): a task of another size here (a subset, a toy copy
# under a published folder name) is not the published task, and its published numbers are not shown beside it.
PUBLISHED_CLASSES = {"birds_525": 525, "plankton": 86, "insects": 104, "insects_2": 102, "plantnet": 25, "fungi": 25,
                     "plantvillage": 38, "medicinal_leaf": 25, "plantdoc": 27, "rare_species": 400}


# Rows that describe the tasks rather than score them (the markdown puts them in one table).
ZERO_SHOT_METRICS = {"zero-shot top-1": "top1", "zero-shot top-3": "top3", "zero-shot top-5": "top5",
                     "zero-shot mean per-class top-1": "mean_per_class_top1"}
SIZE_METRICS = {"images": "images", "classes": "classes", "zero-shot classes": "zero_shot_classes",
                "merged classes": "merged_classes"}


def find_tasks(tasks_dir: str | os.PathLike | None, tfds_data_dir: str | os.PathLike | None = None) -> dict:
    """{task: source} for every task present: a folder under `tasks_dir` with one of the published names
    (`eval_sets.TASK_FOLDERS`, e.g. kaggle_bird/ or birds_525/ for Birds 525) or named like the task, or a TFDS build
    in `tfds_data_dir`. Any other sub-folder holding a task CSV is a custom task named after the folder. TFDS is only
    imported when `tfds_data_dir` is given."""
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise FileNotFoundError(f"tasks folder {tasks_dir} does not exist")
    found, used = {}, set()
    for task, folders in TASK_FOLDERS.items():
        if tasks_dir:
            for name in dict.fromkeys((*folders, task)):
                if find_task_csv(Path(tasks_dir) / name) is not None:
                    found[task] = FolderEvalSource(Path(tasks_dir) / name)
                    used.add(name)
                    break
        if task not in found and tfds_data_dir:
            from bioclip_jax.data.tfds_eval import EvalSetSource

            try:
                found[task] = EvalSetSource(task, tfds_data_dir)
            except FileNotFoundError:
                pass
    if tasks_dir:
        for folder in sorted(p for p in Path(tasks_dir).iterdir() if p.is_dir()):
            if folder.name not in used and find_task_csv(folder) is not None:
                found[folder.name] = FolderEvalSource(folder)
    return found


def merge_classes(names: Sequence[str], labels: Sequence[str]) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """BioCLIP's class list from per-image names: (distinct names in order of first appearance, each image's index
    into them, {name: the labels it merged} for names shared by more than one label)."""
    classes = first_appearance(names)
    index = {name: i for i, name in enumerate(classes)}
    labels_of: dict[str, dict] = {}
    for name, label in zip(names, labels):
        labels_of.setdefault(name, {})[label] = None
    merged = {name: list(ls) for name, ls in labels_of.items() if len(ls) > 1}
    return classes, np.array([index[n] for n in names], dtype=np.int64), merged


def _rows_of(source, labels, ranks, commons) -> list[EvalRow]:
    """Each embedded image's row: the source's own (with subspecies) where it has them, else rebuilt."""
    rows = getattr(source, "rows", None)
    if rows is not None and [r.class_name for r in rows] == list(labels):
        return list(rows)
    return [EvalRow(filepath="", class_name=label, ranks=tuple(r), common=common)
            for label, r, common in zip(labels, ranks, commons)]


def evaluate_task(model: Encoder, source, text_type: str = "taxon_com", templates: str = "bioclip",
                  shots: Sequence[int] = (), batch_size: int = 64, few_shot_sampling: str = "bioclip",
                  folds: int = 5, name: str = "task") -> dict:
    """Zero-shot (top-1/3/5, mean per class) and k-shot (mean, std over `folds`) results of one task."""
    if text_type not in EVAL_TEXT_TYPES:
        raise InputError(f"unknown evaluation text type {text_type!r}; expected one of {EVAL_TEXT_TYPES}")
    if templates not in TEMPLATE_SETS:
        raise InputError(f"unknown template set {templates!r}; expected one of {tuple(TEMPLATE_SETS)}")
    features, ranks, labels, commons = embed_eval_set(model, source, batch_size=batch_size, desc=f"embedding {name}")
    names = [row.eval_name(text_type) for row in _rows_of(source, labels, ranks, commons)]
    classes, truth, merged = merge_classes(names, labels)
    species = first_appearance(labels)
    merged_count = sum(len(ls) - 1 for ls in merged.values())
    if merged:
        shown = "; ".join(f"{n!r} <- {', '.join(ls)}" for n, ls in list(merged.items())[:10])
        log.warning("%s: %d classes have %d distinct %s names; merged as BioCLIP does: %s", name, len(species),
                    len(classes), text_type, shown)
    if "" in classes:
        log.warning("%s: some classes have an empty %s name (e.g. no common name); they share one class", name,
                    text_type)
    weights = zero_shot_classifier(model, classes, TEMPLATE_SETS[templates])
    result = {"images": len(labels), "classes": len(species), "zero_shot_classes": len(classes),
              "merged_classes": merged_count, "merged": merged, "text_type": text_type, "templates": templates,
              "template_count": len(TEMPLATE_SETS[templates]), "few_shot_sampling": few_shot_sampling,
              "zero_shot": topk_accuracy(model.logit_scale * features @ weights.T, truth)}
    for k, scores in few_shot(features, labels, shots=shots, folds=folds, sampling=few_shot_sampling).items():
        if "skipped" in scores:
            log.warning("%s: %d-shot skipped: %s", name, k, scores["skipped"])
        result[f"{k}_shot"] = scores
    return result


def run_benchmark(model: Encoder, sources: dict, out_dir: str | os.PathLike, model_name: str = "this model",
                  **kwargs) -> dict:
    """Evaluates every task in `sources` and writes results.{json,csv,md} to the local folder `out_dir`."""
    if paths.is_url(out_dir):  # pathlib would make a local `gs:` folder of it after the whole evaluation
        raise InputError(f"{out_dir}: the results folder must be a local path")
    if not sources:
        raise FileNotFoundError("no evaluation task found: expected folders such as PLK_Mini/metadata.csv, "
                                "kaggle_bird/metadata.csv, rare_species/metadata.csv or rare-species/metadata/"
                                "rarespecies-catalog.csv, or TFDS builds (bioclip_jax.data.tfds_eval.build)")
    results = {task: evaluate_task(model, source, name=task, **kwargs) for task, source in sources.items()}
    if jax.process_index() != 0:  # every process holds the same results (features are gathered); one writes them
        return results
    paths.make_dirs(paths.resolve(out_dir))
    out_dir = Path(out_dir)
    table = results_table(results, model_name)
    (out_dir / "results.json").write_text(json.dumps(
        {"model": model_name, "tasks": results,
         "published": [{"metric": m, "model": n, "source": s, "tasks": v, "mean_10_tasks": mean}
                       for m, n, s, v, mean in PUBLISHED],
         "table": table}, indent=2) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(table)
    (out_dir / "results.md").write_text(results_markdown(table))
    return results


def _ordered_tasks(results: dict) -> list[str]:
    return [t for t in TASK_NAMES if t in results] + sorted(t for t in results if t not in TASK_NAMES)


def _shots(results: dict) -> list[int]:
    return sorted({int(key[:-len("_shot")]) for r in results.values() for key in r
                   if key.endswith("_shot") and key[:-len("_shot")].isdigit()})


def _percent(values: list[float | None]) -> list[str]:
    return [f"{v:.1f}" if v is not None else "" for v in values]


def results_table(results: dict, model_name: str) -> list[list[str]]:
    """Header + rows (metric, model, source, one column per task present, mean over those tasks, published mean over
    the paper's 10 tasks): everything measured (zero-shot top-1/3/5 and mean per-class top-1, k-shot), each metric
    followed by the published rows for it, then the task sizes. Published numbers appear only under a task of the
    published class count. Percentages with one decimal; k-shot cells are "mean ± std" over the folds."""
    tasks = _ordered_tasks(results)
    header = ["metric", "model", "source", *[TASK_NAMES.get(t, t) for t in tasks], "mean", "published 10-task mean"]
    rows = [header]
    ours = "measured here"
    published = [t for t in tasks if results[t]["classes"] == PUBLISHED_CLASSES.get(t)]
    for metric, key in ZERO_SHOT_METRICS.items():
        values = [100 * results[t]["zero_shot"][key] for t in tasks]
        rows.append([metric, model_name, ours, *_percent(values), f"{np.mean(values):.1f}", ""])
        rows += _published_rows(metric, tasks, published)
    for k in _shots(results):
        metric = f"{k}-shot top-1"
        cells, means = [], []
        for t in tasks:
            r = results[t].get(f"{k}_shot", {})
            if "mean" in r:
                cells.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}")
                means.append(100 * r["mean"])
            else:
                cells.append("skipped" if "skipped" in r else "")
        partial = "" if len(means) == len(tasks) else f" ({len(means)} task{'s' if len(means) > 1 else ''})"
        mean = f"{np.mean(means):.1f}{partial}" if means else ""
        rows.append([metric, model_name, ours, *cells, mean, ""])
        rows += _published_rows(metric, tasks, published)
    for metric, key in SIZE_METRICS.items():
        rows.append([metric, model_name, ours, *[str(results[t][key]) for t in tasks], "", ""])
    return rows


def _published_rows(metric: str, tasks: list[str], published: list[str]) -> list[list[str]]:
    """The published rows of `metric`, with numbers only under the `published` tasks (those of the published size)."""
    rows = []
    for m, model, source, values, mean10 in PUBLISHED:
        if m != metric or not (mean10 is not None or any(t in values for t in published)):
            continue
        shown = [values.get(t) if t in published else None for t in tasks]
        cells = [f"{v:g}" if v is not None else "" for v in shown]
        mean = f"{np.mean(shown):.1f}" if all(v is not None for v in shown) else ""
        rows.append([metric, model, source, *cells, mean, f"{mean10:g}" if mean10 is not None else ""])
    return rows


def results_markdown(table: list[list[str]]) -> str:
    """One markdown table per metric (ours first, then the published rows), each task's column headed by its class
    and image counts; a note for tasks under a published name whose class count is not the published one; then the
    task sizes."""
    header, rows = table[0], table[1:]
    tasks = header[3:-2]
    sizes = {r[0]: r[3:3 + len(tasks)] for r in rows if r[0] in SIZE_METRICS}
    headed = [f"{t} ({int(c):,} classes, {int(n):,} images)"
              for t, c, n in zip(tasks, sizes["classes"], sizes["images"])]
    columns = ["model", "source", *headed, *header[-2:]]
    out = ["# Evaluation results", "",
           "Accuracy in %; k-shot = mean ± std over the folds. 'mean' averages the tasks shown; the published 10-task "
           "mean is the paper's. Published rows name their source and appear only under a task of the published "
           "class count.", ""]
    names = {name: task for task, name in TASK_NAMES.items()}
    other = [f"{t}: {c} classes here, {PUBLISHED_CLASSES[names[t]]} published" for t, c in zip(tasks, sizes["classes"])
             if t in names and int(c) != PUBLISHED_CLASSES[names[t]]]
    if other:
        out += ["Not the published task, so no published numbers beside it: " + "; ".join(other) + ".", ""]
    for metric in dict.fromkeys(r[0] for r in rows if r[0] not in SIZE_METRICS):
        out += [f"## {metric}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(r[1:]) + " |" for r in rows if r[0] == metric]
        out.append("")
    out += ["## Tasks", "", "Zero-shot classes are the distinct class names after merging (BioCLIP merges classes "
            "whose names coincide); few-shot uses the `class` column.", "",
            "| | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    out += ["| " + r[0] + " | " + " | ".join(r[3:3 + len(tasks)]) + " |" for r in rows if r[0] in SIZE_METRICS]
    return "\n".join(out) + "\n"
