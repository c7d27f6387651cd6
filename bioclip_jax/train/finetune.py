"""Fine-tune a CLIP on a user's labelled images, in one call: a folder of class subfolders or a CSV -> a stratified
held-out split -> shards -> zero-shot before -> one method (configs/finetune.py through the trainer, or a linear
probe) -> the same evaluation after, a retention check, results.md and a model folder that open_clip, pybioclip and
`bioclip_jax.load` read.

    result = finetune("photos/", "runs/ft", start="bioclip", method="lora")
    print(result.report)

OUT holds: split.csv (every image, its class and split), shards/ (train, val = the held-out images), train/ (the
trainer's run: rerunning the same call resumes it), model/ (open_clip folder, classes.json, probe.json for the
probe), results.md and results.json. A finished OUT is never written over.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from typing import Sequence

import jax
import ml_collections
import numpy as np

from bioclip_jax import hardware, paths
from bioclip_jax.convert.checkpoint import export_open_clip
from bioclip_jax.data import pipeline
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.data.transforms import NORMALIZATION
from bioclip_jax.errors import InputError
from bioclip_jax.evaluate.zero_shot import embed_eval_set, per_rank_accuracy
from bioclip_jax.inference.io import InputWarning
from bioclip_jax.inference.model import Model, load
from bioclip_jax.inference.probe import Probe, fit_probe
from bioclip_jax.inference.templates import TEMPLATE_SETS
from bioclip_jax.inference.zero_shot import zero_shot_classifier
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.shards import make_shards
from bioclip_jax.shards.folder import LabelledImages, LabelledSource, read_labelled_images, stratified_split
from bioclip_jax.train.config import apply_override, load_config
from bioclip_jax.train.trainer import train

log = logging.getLogger(__name__)
METHODS = ("full", "vision", "lora", "probe")
METHOD_TRAINABLE = {"full": "all", "vision": "vision", "lora": "lora"}
DEFAULT_LR = {"full": 1e-5, "vision": 1e-5, "lora": 1e-4}
WARMUP_FRACTION = 0.1
MAX_BATCH = 256  # a fine-tune's global batch: contrastive batches of a few classes gain little from more
MIN_BATCH = 32  # ... and at least this where the split allows (the cap of a tenth of the split stops here)
MIN_STEPS = 300  # a small split's steps (default_steps)
MEMORY_USE = 0.7  # of a device's memory, for params, optimizer state and activations (the rest: XLA's own)
# Activations kept with remat "dots", as a share of default_settings' per-pair estimate: measured, ViT-L/14 full
# fine-tuning, 32 pairs per v5e chip, 9.22 GiB of temporaries (docs/finetune.md): 0.29 GiB a pair against the
# estimate's 0.31 (a third, assumed before, let LoRA with replay plan 64 rows a chip: about 19 GiB on a 16 GiB chip).
REMAT_DOTS_SHARE = 0.9
WISE_ALPHA = 0.5  # WiSE-FT's mixing weight without --replay (with it, 1: replay keeps what the start model knows)
REPLAY_FRACTION = 1.0  # --replay's rows per batch, as a fraction of the global batch (docs/finetune.md: on the bench
# a quarter of it lost 4.5 points of retention, a half 1.8, as many rows as the user's 0.2)


@dataclasses.dataclass
class FinetuneResult:
    out: str
    model_dir: str
    results: dict
    report: str


@dataclasses.dataclass
class Options:
    """What a fine-tune is asked to do; 0 (or None) means: chosen from the data and the device."""
    start: str = "bioclip"
    method: str = "full"
    arch: str | None = None  # architecture of a bare weights file
    heldout_fraction: float = 0.2
    seed: int = 0
    epochs: float = 0.0
    steps: int = 0
    batch_size: int = 0
    lr: float = 0.0
    lora_rank: int = 8
    templates: str = "openai"  # prompt templates of the zero-shot evaluation (pybioclip's CustomLabelsClassifier)
    retention: str | None = None  # shards of other taxa: zero-shot on them before and after
    replay: str | None = None  # shards mixed into every batch (config.replay.data)
    replay_per_batch: int = 0  # replay rows on top of each global batch; 0: as many as the batch's own
    wise_alpha: float | None = None  # WiSE-FT: export (1 - alpha) start + alpha fine-tuned; None: `wise_alpha()`
    overrides: tuple[str, ...] = ()  # config overrides KEY=VALUE, applied last


def finetune(data: str | os.PathLike, out: str | os.PathLike, options: Options | None = None, *,
             progress: bool = True, workers: int | None = None) -> FinetuneResult:
    """Fine-tunes `options.start` on the images of `data` (a folder of class subfolders or a CSV) into `out`."""
    o = options or Options()
    started = time.perf_counter()
    _check_options(o)
    out = os.path.abspath(os.fspath(out))
    _check_finished(out)
    images = read_labelled_images(os.fspath(data))
    train_rows, held_rows, notes = stratified_split(images.rows, o.heldout_fraction, o.seed)
    for line in images.warnings + notes:
        warnings.warn(line, InputWarning, stacklevel=2)
    _check_split(data, images, train_rows, held_rows)
    start = _load_start(o.start, o.arch)
    _claim(out, os.path.abspath(os.fspath(data)), o)  # the inputs are checked: now OUT may be written
    _write_split(os.path.join(out, "split.csv"), train_rows, held_rows)
    summary = make_shards(LabelledSource({"train": train_rows, "val": held_rows}), os.path.join(out, "shards"),
                          resize=start.config.vision.image_size, workers=workers, progress=progress)
    log.info("%s", summary.report())
    notes += _unusable_images(summary, os.fspath(data))
    held_out = os.path.join(out, "shards", "val")
    classes, prompts = class_prompts(images)
    before = evaluate(start, held_out, classes, prompts, o.templates, o.retention)
    model_dir = os.path.join(out, "model")
    if o.method == "probe":
        model, probe = start, _fit_probe(start, os.path.join(out, "shards", "train"))
        after = evaluate(start, held_out, classes, prompts, o.templates, o.retention, probe=probe)
        run = {"method": "probe", "train_images": summary["splits"]["train"]["records"]}
    else:
        config = finetune_config(start, out, summary["splits"]["train"]["records"], images.has_ranks, o)
        result = train(config, os.path.join(out, "train"), progress=progress)
        model = start  # its jitted encoders compiled for the "before" evaluation serve the fine-tuned params too
        model.params = wise_ft(start.params, result.model().params, wise_alpha(o))
        model.source = f"finetune:{out}"
        after = evaluate(model, held_out, classes, prompts, o.templates, o.retention)
        run = {"method": o.method, "train_images": summary["splits"]["train"]["records"], "steps": result.step,
               "global_batch_size": config.train.global_batch_size, "accum_steps": config.train.accum_steps,
               "remat": config.remat or "off", "dtype": config.dtype, "lr": config.train.lr,
               "warmup_steps": config.train.warmup_steps, "text_type": config.data.text_type,
               "distinct_captions": config.train.distinct_captions, "wise_alpha": wise_alpha(o),
               "replay": config.replay.data or None, "replay_per_batch": config.replay.per_batch,
               "final_loss": _final_loss(result)}
        probe = None
    _export(model, model_dir, classes, prompts, o.templates, probe)
    results = {"start": o.start, "data": os.path.abspath(os.fspath(data)), "run": run, "before": before,
               "after": after, "heldout_images": len(held_rows), "classes": classes,
               "seconds": time.perf_counter() - started, "warnings": images.warnings + notes}
    report = format_results(results)
    paths.write_atomic(paths.resolve(os.path.join(out, "results.json")), json.dumps(results, indent=2).encode())
    paths.write_atomic(paths.resolve(os.path.join(out, "results.md")), report.encode())
    return FinetuneResult(out, model_dir, results, report)


def _check_options(o: Options) -> None:
    if o.method not in METHODS:
        raise InputError(f"method {o.method!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 < o.heldout_fraction < 1.0:
        raise InputError(f"heldout fraction {o.heldout_fraction}: expected a number between 0 and 1")
    if o.templates not in TEMPLATE_SETS:
        raise InputError(f"templates {o.templates!r}: expected one of {', '.join(TEMPLATE_SETS)}")
    if o.wise_alpha is not None and not 0.0 <= o.wise_alpha <= 1.0:
        raise InputError(f"wise alpha {o.wise_alpha}: expected a number from 0 (the start model) to 1 (the "
                         "fine-tuned weights)")
    if o.replay and not os.path.exists(o.replay):
        raise FileNotFoundError(f"replay set {o.replay!r}: no such shards folder or file")
    if o.retention and not os.path.exists(o.retention):
        raise FileNotFoundError(f"retention set {o.retention!r}: no such shards folder or file")


def _check_finished(out: str) -> None:
    if os.path.exists(os.path.join(out, "results.md")):
        raise InputError(f"{out} already holds a finished fine-tune (results.md): nothing was changed; pass another "
                         "output folder, or delete this one to redo it")


def _claim(out: str, data: str, o: Options) -> None:
    """Refuses an OUT that holds a fine-tune started with other settings; records this request so that the same
    call, rerun, resumes."""
    request = {"data": data, **{k: v for k, v in dataclasses.asdict(o).items()}}
    request["overrides"] = list(o.overrides)
    request["wise_alpha"] = wise_alpha(o)  # resolved: the same model whether the default or its value was asked for
    path = os.path.join(out, "request.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != request:
            changed = sorted(k for k in set(before) | set(request) if before.get(k) != request.get(k))
            raise InputError(f"{out} holds an unfinished fine-tune with other settings ({', '.join(changed)}); rerun "
                             "it with the same settings to resume, or pass another output folder")
    os.makedirs(out, exist_ok=True)
    paths.write_atomic(paths.resolve(path), json.dumps(request, indent=2).encode())


def _check_split(data, images: LabelledImages, train_rows: list, held_rows: list) -> None:
    if len(images.classes) < 2:
        raise InputError(f"{data}: {len(images.classes)} class found ({', '.join(images.classes)}); fine-tuning a "
                         "classifier needs at least 2")
    if not held_rows:
        raise InputError(f"{data}: no image can be held out to evaluate (every class has one image); add images")
    if not train_rows:
        raise InputError(f"{data}: every image is in the held-out split; nothing to train on")


def _unusable_images(summary, data: str) -> list[str]:
    """Images make-shards had to skip (undecodable, missing), as warnings: they neither train nor count."""
    reasons: dict[str, int] = {}
    for info in summary["splits"].values():
        for reason, n in info["skipped"]["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    if not reasons:
        return []
    line = (f"{data}: skipped {sum(reasons.values())} image(s) that could not be used ("
            f"{', '.join(f'{r}: {n}' for r, n in reasons.items())}; listed in shards/summary.json)")
    warnings.warn(line, InputWarning, stacklevel=3)
    return [line]


def _load_start(start: str, arch: str | None) -> Model:
    """The start model; anything that is not a CLIP (no text tower, other weights) is one line naming it."""
    try:
        return load(start, model=arch)
    except InputError as e:
        raise InputError(f"start model {start!r} is not a CLIP model bioclip_jax can fine-tune: {e}") from None


def _write_split(path: str, train_rows: list[dict], held_rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "class", "split"])
        for split, rows in (("train", train_rows), ("val", held_rows)):
            writer.writerows([r["filepath"], r["class"], split] for r in rows)
    os.replace(path + ".tmp", path)


def class_prompts(images: LabelledImages) -> tuple[list[str], list[str]]:
    """(classes, the name each is prompted with): the taxonomic name where ranks are known (BioCLIP's strongest
    text), else the class name as given."""
    taxa = {r["class"]: r["taxon"] for r in images.rows}
    classes = images.classes
    return classes, [taxa[c].taxonomic_name if images.has_ranks else c for c in classes]


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(model: Model, held_out: str, classes: Sequence[str], prompts: Sequence[str], templates: str,
             retention: str | None, probe: Probe | None = None) -> dict:
    """{"heldout": {"top1", "per_class": {class: top1}}, "retention": {...} or None}: zero-shot over the user's
    classes (or the probe's predictions) on the held-out images."""
    features, _, labels, _ = embed_eval_set(model, held_out, desc="held-out images")
    if probe is not None:
        predicted = [probe.classes[i] for i in probe.logits(features).argmax(axis=1)]
    else:
        text = zero_shot_classifier(model, list(prompts), TEMPLATE_SETS[templates])
        predicted = [classes[i] for i in (features @ text.T).argmax(axis=1)]
    return {"heldout": accuracy(labels, predicted),
            "retention": retention_accuracy(model, retention) if retention else None}


def accuracy(labels: Sequence[str], predicted: Sequence[str]) -> dict:
    correct = np.asarray([a == b for a, b in zip(labels, predicted)], bool)
    per_class = {c: float(correct[[lab == c for lab in labels]].mean()) for c in sorted(set(labels))}
    return {"top1": float(correct.mean()) if len(correct) else 0.0, "images": len(labels),
            "mean_per_class_top1": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "per_class": per_class}


def retention_accuracy(model: Model, data: str) -> dict:
    """Zero-shot species top-1 on other taxa (shards with ranks: TreeOfLife, the synthetic tree), as the demo
    prompts them (the lineage), over the species present in the set: what the fine-tune must not forget."""
    features, ranks, _, _ = embed_eval_set(model, data, desc="retention")
    taxa = list({tuple(r): Taxon.from_ranks(r) for r in ranks}.values())
    if len(taxa) < 2 or not all(t.species for t in taxa):
        raise InputError(f"retention set {data}: expected shards of at least 2 species with their ranks")
    result = per_rank_accuracy(model, features, ranks, taxa, ranks=("species",))["species"]
    return {"top1": result["top1"], "species": len(taxa), "images": len(features), "data": data}


# ------------------------------------------------------------------------------------------------- methods
def _fit_probe(model: Model, train_shards: str) -> Probe:
    features, _, labels, _ = embed_eval_set(model, train_shards, desc="train images (probe)")
    return fit_probe(features, labels)


def device_memory(device=None) -> int | None:
    """Bytes one device offers: what its runtime reports (GPUs, TPUs), else the hardware table; None on a CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    chip = hardware.find(device.device_kind)
    return chip.hbm_bytes if chip else None


def default_settings(n_train: int, model: CLIPConfig, method: str, *, memory: int | None, devices: int,
                     epochs: float = 0.0, batch_size: int = 0, replay: bool = False) -> dict:
    """Config values chosen from the data and the device: {config key: value}. On a CPU: float32, batch 32, no
    remat. On an accelerator: bf16; the per-device batch that an estimate of the step's memory allows (params and
    optimizer state of what trains, plus per pair its activations: layers x tokens x width x 48 bytes, REMAT_DOTS_SHARE
    of that with remat "dots"), remat only where 64 pairs would not fit; accumulation where the device holds fewer than
    32 pairs. With `replay`, each pair brings REPLAY_FRACTION replay rows along, in the same memory. The global batch
    is at most a tenth of the training split (at least 32): a few hundred photos train in steps of 32, as measured
    (docs/finetune.md), not in a handful of large ones. Steps: `default_steps`; warmup a tenth of them."""
    if n_train < devices:
        raise InputError(f"{n_train} training images cannot fill a batch over {devices} devices")
    settings: dict = {"dtype": "float32", "remat": "", "scan_layers": False, "train.accum_steps": 1}
    per_device, accum = 32, 1
    if memory is not None:
        v, t = model.vision, model.text
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        per_pair = 24 * 2 * (v.layers * tokens * v.width + t.layers * t.context_length * t.width)
        params = 12 * (v.layers * v.width ** 2 + t.layers * t.width ** 2)
        state = params * (4 + (12 if method != "lora" else 0))  # fp32 params; grads + Adam moments of what trains
        free = MEMORY_USE * memory - state
        per_pair *= 1 + (REPLAY_FRACTION if replay else 0.0)
        fits = max(1, int(free // per_pair))
        remat = "" if fits >= 64 else "dots"
        fits = fits if not remat else max(1, int(free // (per_pair * REMAT_DOTS_SHARE)))
        per_device = 2 ** int(math.log2(min(fits, MAX_BATCH)))
        accum = 1 if per_device >= 32 else 32 // per_device
        settings.update({"dtype": "bfloat16", "remat": remat, "scan_layers": True})
    wanted = batch_size or min(MAX_BATCH, per_device * accum * devices, max(MIN_BATCH, n_train // 10))
    unit = devices * accum
    global_batch = max(unit, min(wanted, n_train) // unit * unit)
    steps = max(1, math.ceil(epochs * n_train / global_batch) if epochs else default_steps(n_train, global_batch))
    settings.update({"train.global_batch_size": global_batch, "train.accum_steps": accum, "train.steps": steps,
                     "train.epochs": 0.0, "train.warmup_steps": max(1, round(WARMUP_FRACTION * steps)),
                     "checkpoint.every_steps": min(steps, 500), "log_every_steps": max(1, min(10, steps // 10))})
    return settings


def default_steps(n_train: int, global_batch: int) -> int:
    """10 epochs under 10K training images, raised to MIN_STEPS where that is fewer (at most 30 epochs: 10 epochs of
    320 images, 100 steps, stayed under the linear probe on the bench, 300 beat it; docs/finetune.md); 5 epochs under
    100K; else 2."""
    per_epoch = n_train / global_batch
    if n_train >= 10_000:
        return math.ceil((5 if n_train < 100_000 else 2) * per_epoch)
    return max(math.ceil(10 * per_epoch), min(MIN_STEPS, math.ceil(30 * per_epoch)))


def finetune_config(start: Model, out: str, n_train: int, has_ranks: bool, o: Options) -> ml_collections.ConfigDict:
    """configs/finetune.py with the start model, the shards, the method and `default_settings`, then the user's
    overrides."""
    config = load_config("finetune")
    model_json = os.path.join(out, "start_model.json")
    paths.write_atomic(paths.resolve(model_json), json.dumps({"model_cfg": start.config.to_open_clip()}).encode())
    normalization = _normalization(start)
    values = {"model": model_json, "init": o.start, "init_model": o.arch or "", "data.train": os.path.join(
        out, "shards", "train"), "data.val": "", "data.normalization": normalization, "eval.normalization":
        normalization, "data.text_type": "mixed" if has_ranks else "com", "train.trainable": METHOD_TRAINABLE[o.method],
        "train.lora_rank": o.lora_rank, "train.lr": o.lr or DEFAULT_LR[o.method], "train.seed": o.seed,
        **default_settings(n_train, start.config, o.method, memory=device_memory(), devices=jax.device_count(),
                           epochs=o.epochs, batch_size=o.batch_size, replay=bool(o.replay))}
    if o.steps:
        values.update({"train.steps": o.steps, "train.warmup_steps": max(1, round(WARMUP_FRACTION * o.steps)),
                       "checkpoint.every_steps": min(o.steps, 500)})
    for key, value in values.items():
        node, *parts = key.split(".")
        target = config if not parts else config[node]
        target[parts[0] if parts else node] = value
    if o.replay:
        _set_replay(config, o.replay, o.replay_per_batch, jax.device_count())
    for override in o.overrides:
        apply_override(config, override)
    return config


def _set_replay(config: ml_collections.ConfigDict, data: str, per_batch: int, devices: int) -> None:
    """Replay of `data` in every batch: `per_batch` rows (default REPLAY_FRACTION of the global batch, a multiple of the
    devices x accumulation steps) through the one visual head `proj` (no second head: the export is a plain CLIP),
    captioned by their own text where the records have one, else by their ranks as the main stream is."""
    unit = devices * config.train.accum_steps
    rows = per_batch or max(unit, round(REPLAY_FRACTION * config.train.global_batch_size / unit) * unit)
    source = pipeline.open_source(data)
    if not len(source):
        raise InputError(f"replay set {data!r}: no records")
    record, _ = pipeline.decode_example(source, 0, source[0])
    config.replay.update({"data": data, "per_batch": rows, "continual_proj": False,
                          "text_type": "text" if record.get("text") else config.data.text_type})


def wise_alpha(o: Options) -> float:
    """The WiSE-FT alpha of a fine-tune: as given, else 1 (the fine-tuned weights) with --replay, which keeps what the
    start model knows by training on it, and WISE_ALPHA without (then the mix is the only thing that keeps it)."""
    if o.wise_alpha is not None:
        return o.wise_alpha
    return 1.0 if o.replay else WISE_ALPHA


def wise_ft(start: dict, tuned: dict, alpha: float) -> dict:
    """WiSE-FT (Wortsman et al. 2022): every weight (1 - alpha) * start + alpha * tuned; alpha 1 is the fine-tuned
    model, 0 the start. LoRA's merged kernels are start + delta, so this scales the delta by alpha."""
    if jax.tree_util.tree_structure(start) != jax.tree_util.tree_structure(tuned):
        raise ValueError("WiSE-FT: the fine-tuned params do not have the start model's structure")
    if alpha == 1.0:
        return tuned
    return jax.tree_util.tree_map(
        lambda s, t: (np.asarray(s, np.float32) * (1.0 - alpha) + np.asarray(t, np.float32) * alpha).astype(
            np.asarray(t).dtype), start, tuned)


def _normalization(model: Model) -> str:
    """The name of the start model's mean/std (the pipeline normalises on the device by name)."""
    for name, (mean, std) in NORMALIZATION.items():
        if np.allclose(mean, model.preprocess.mean, atol=1e-4) and np.allclose(std, model.preprocess.std, atol=1e-4):
            return name
    raise InputError(f"start model: its preprocessing mean {model.preprocess.mean} / std {model.preprocess.std} is "
                     f"neither of {', '.join(NORMALIZATION)}, which fine-tuning normalises with")


def _export(model: Model, folder: str, classes: list[str], prompts: list[str], templates: str,
            probe: Probe | None) -> None:
    """The open_clip folder (also read by pybioclip and bioclip_jax.load), classes.json, and probe.json."""
    export_open_clip(model, folder)
    info = {"classes": classes, "prompts": prompts, "templates": templates}
    paths.write_atomic(paths.resolve(os.path.join(folder, "classes.json")), json.dumps(info, indent=2).encode())
    if probe is not None:
        probe.save(folder)


# ------------------------------------------------------------------------------------------------- report
def _final_loss(result) -> float | None:
    """The run's last logged loss: from this call's history, else (a rerun that found training finished) the
    run's metrics.jsonl."""
    if result.history:
        return result.history[-1]["loss"]
    path = os.path.join(os.fspath(result.workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        losses = [json.loads(line).get("loss") for line in f if line.strip()]
    return next((x for x in reversed(losses) if x is not None), None)


def _replay_words(run: dict) -> str:
    return f"replay {run['replay_per_batch']} rows per batch from {run['replay']}, " if run.get("replay") else ""


def format_results(r: dict) -> str:
    before, after, run = r["before"], r["after"], r["run"]
    name = {"probe": "linear probe", "full": "full fine-tuning", "vision": "vision tower only",
            "lora": "LoRA"}[run["method"]]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"# Fine-tune: {name} from {r['start']}", "",
             f"{len(r['classes'])} classes; {run['train_images']} training images, {r['heldout_images']} held out "
             f"(stratified; split.csv); {r['seconds'] / 60:.1f} min.", ""]
    if "steps" in run:
        lines += [f"{run['steps']} steps at global batch {run['global_batch_size']} (accumulation "
                  f"{run['accum_steps']}, remat {run['remat']}, {run['dtype']}), lr {run['lr']:g}, "
                  f"{run['warmup_steps']} warmup steps, captions {run['text_type']}, "
                  f"{_replay_words(run)}WiSE-FT alpha {run['wise_alpha']:g}, final loss "
                  f"{'n/a' if run['final_loss'] is None else format(run['final_loss'], '.3f')}.", ""]
    lines += ["| | before (zero-shot) | after |", "|---|---|---|",
              f"| held-out top-1 | {pct(before['heldout']['top1'])} | {pct(after['heldout']['top1'])} |",
              f"| held-out mean per-class top-1 | {pct(before['heldout']['mean_per_class_top1'])} | "
              f"{pct(after['heldout']['mean_per_class_top1'])} |"]
    if before["retention"]:
        b, a = before["retention"], after["retention"]
        lines.append(f"| retention: zero-shot species top-1 on {b['species']} other species ({b['images']} images) "
                     f"| {pct(b['top1'])} | {pct(a['top1'])} |")
    else:
        lines += ["", "Retention not measured (pass a retention set: shards of other species)."]
    lines += ["", "## Per class (held-out top-1)", "", "| class | before | after |", "|---|---|---|"]
    lines += [f"| {c} | {pct(before['heldout']['per_class'].get(c, 0.0))} | "
              f"{pct(after['heldout']['per_class'].get(c, 0.0))} |" for c in sorted(before["heldout"]["per_class"])]
    if r["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"
