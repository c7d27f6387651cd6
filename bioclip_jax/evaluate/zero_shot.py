"""Zero-shot classification: class embeddings from captions, and accuracy at every taxonomic rank.

Per-rank evaluation: at rank r the label set is the distinct lineages kingdom..r among the candidate taxa, each
described by its taxonomic name ("a photo of Animalia Chordata Aves."); an image is right at r when the nearest
class embedding is its own lineage at r.

Every function takes an `Encoder` (inference/encoder.py): a single-device `Model`, or the `MeshEncoder` the trainer
and `eval` hand in, on which every chip of every host encodes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from bioclip_jax.data import pipeline
from bioclip_jax.data.taxonomy import RANKS, Taxon
from bioclip_jax.inference.encoder import Encoder
from bioclip_jax.inference.model import encode, normalize_features
from bioclip_jax.inference.zero_shot import class_embeddings
from bioclip_jax.models.loss import clip_loss

log = logging.getLogger(__name__)


def embed_eval_set(model: Encoder, data: Any, batch_size: int = 64, worker_count: int = 0, desc: str = "embedding",
                   failures: list[str] | None = None) -> tuple[np.ndarray, list[tuple[str, ...]], list[str], list[str]]:
    """Normalised image features [N, D], ranks, labels and common names of every example of an evaluation set (each
    process encodes its share on its chips; the features, never the params, are gathered, in source order). Images
    that cannot be read or decoded are left out, as predict does: a warning gives their count and the first few
    (shard file, record, id, why); `failures`, if given, receives this process's full list."""
    feats, ranks, labels, commons, indices, failed = [], [], [], [], [], []
    data = pipeline.open_source(data)
    batches = pipeline.eval_batches(data, batch_size=batch_size, preprocess=model.preprocess,
                                    worker_count=worker_count)
    bar = tqdm(batches, desc=desc, leave=False, unit="batch",  # this process's share, as eval_batches splits it
               total=math.ceil(math.ceil(len(data) / jax.process_count()) / batch_size))
    for batch in bar:
        keep = batch["mask"]
        failed += batch["failed"]
        features = model.encode_pixels(batch["image"])[keep]
        feats.append(normalize_features(features))
        ranks += [tuple(r) for r in batch["ranks"][keep]]
        labels += list(batch["label"][keep])
        commons += list(batch["common"][keep])
        indices.append(batch["index"][keep])
    if failed:
        log.warning("%s: skipped %d image(s) that could not be read or decoded: %s%s", desc, len(failed),
                    " | ".join(failed[:3]), f" | and {len(failed) - 3} more" if len(failed) > 3 else "")
    if failures is not None:
        failures += failed
    features = np.concatenate(feats) if feats else np.zeros((0, model.config.embed_dim), np.float32)
    features, ranks, labels, commons, indices = _gather_processes(features, ranks, labels, commons,
                                                                  np.concatenate(indices or [[]]))
    order = np.argsort(indices, kind="stable")
    return (features[order], [ranks[i] for i in order], [labels[i] for i in order],
            [commons[i] for i in order])


def _gather_processes(features, ranks, labels, commons, indices):
    import jax

    if jax.process_count() == 1:
        return features, ranks, labels, commons, indices
    # Strings do not travel through collectives: gather the features and indices as arrays, and ranks and labels
    # as JSON bytes.
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps([ranks, labels, commons]).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(payload), len(features)]))
    width = int(sizes[:, 0].max())
    blobs = multihost_utils.process_allgather(np.pad(payload, (0, width - len(payload))))
    rows = int(sizes[:, 1].max())
    pad = lambda a: np.pad(a, [(0, rows - len(a))] + [(0, 0)] * (a.ndim - 1))
    all_features = multihost_utils.process_allgather(pad(features))
    all_indices = multihost_utils.process_allgather(pad(indices.astype(np.int64)))
    out_f, out_r, out_l, out_c, out_i = [], [], [], [], []
    for p, (size, count) in enumerate(sizes):
        r, lbl, c = json.loads(blobs[p][:size].tobytes())
        out_f.append(all_features[p][:count])
        out_i.append(all_indices[p][:count])
        out_r += [tuple(x) for x in r]
        out_l += lbl
        out_c += c
    return np.concatenate(out_f), out_r, out_l, out_c, np.concatenate(out_i)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """Top-k accuracies and mean per-class top-1 accuracy (classes weighted equally)."""
    labels = np.asarray(labels)
    order = np.argsort(-logits, axis=1)
    out = {f"top{k}": float((order[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}
    top1 = order[:, 0] == labels
    out["mean_per_class_top1"] = float(np.mean([top1[labels == c].mean() for c in np.unique(labels)]))
    return out


def lineage_caption(lineage: Sequence[str]) -> str:
    return f"a photo of {' '.join(r for r in lineage if r)}."


def per_rank_accuracy(model: Encoder, image_features: np.ndarray, image_ranks: Sequence[Sequence[str]],
                      candidates: Sequence[Taxon], ranks: Sequence[str] = RANKS) -> dict[str, dict[str, float]]:
    """{rank: {"top1", "chance", "classes"}}: zero-shot accuracy at each rank over the candidates' lineages."""
    results = {}
    for rank in ranks:
        classes = sorted({t.at_rank(rank) for t in candidates})
        index = {c: i for i, c in enumerate(classes)}
        truth = np.array([index.get(Taxon.from_ranks(r).at_rank(rank), -1) for r in image_ranks])
        text = class_embeddings(model, [[lineage_caption(c)] for c in classes])
        predicted = (image_features @ text.T).argmax(axis=1)
        results[rank] = {"top1": float((predicted == truth).mean()) if len(truth) else 0.0,
                         "chance": 1.0 / len(classes), "classes": float(len(classes))}
    return results


def validation_metrics(model: Encoder, data: Any, batch_size: int = 256, loss_batch_size: int = 256,
                       text_type: str = "taxon") -> dict[str, float]:
    """What the trainer logs periodically on held-out images: the CLIP loss (captions of `text_type`, in chunks of
    `loss_batch_size`) and zero-shot top-1 at every rank over the taxa present in the set."""
    features, ranks, _, _ = embed_eval_set(model, data, batch_size=batch_size, desc="validation")
    taxa = [Taxon.from_ranks(r) for r in ranks]
    out: dict[str, float] = {}
    if len(features) >= 2:
        text = encode(model, texts=[t.text(text_type) for t in taxa], batch_size=batch_size)
        chunks = range(0, len(features), loss_batch_size)
        out["val/loss"] = float(np.mean([clip_loss(features[i:i + loss_batch_size], text[i:i + loss_batch_size],
                                                   model.logit_scale) for i in chunks]))
    unique = list({t.ranks: t for t in taxa}.values())
    for rank, result in per_rank_accuracy(model, features, ranks, unique).items():
        out[f"val/zero_shot_{rank}_top1"] = result["top1"]
    return out


def validation_evaluator(data: Any, batch_size: int = 256):
    """The trainer's `evaluate_fn` for periodic validation: `(encoder, step) -> validation_metrics(encoder, data)`."""
    return lambda encoder, step: validation_metrics(encoder, data, batch_size)


def hierarchy_consistency(model: Encoder, image_features: np.ndarray, candidates: Sequence[Taxon],
                          ranks: Sequence[str] = RANKS[:-1]) -> dict[str, float]:
    """{rank: fraction of images whose zero-shot prediction at that rank is the ancestor of their predicted species}.
    1.0 everywhere means the model's answers at different ranks form one consistent lineage."""
    species = sorted({t.ranks for t in candidates})
    species_text = class_embeddings(model, [[lineage_caption(s)] for s in species])
    predicted_species = [species[i] for i in (image_features @ species_text.T).argmax(axis=1)]
    out = {}
    for rank in ranks:
        depth = RANKS.index(rank) + 1
        classes = sorted({s[:depth] for s in species})
        text = class_embeddings(model, [[lineage_caption(c)] for c in classes])
        predicted = [classes[i] for i in (image_features @ text.T).argmax(axis=1)]
        out[rank] = float(np.mean([p == s[:depth] for p, s in zip(predicted, predicted_species)]))
    return out
