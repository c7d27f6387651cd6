"""`predict` over collections (inputs.py, jobs.py): the class text bank stays on the device (topk.DeviceBank, split
over this host's devices; bf16 on accelerators, float32 on CPU) and each batch's softmax over every class, the sums
per taxon or bin, and the top k are taken there; only [B, k] scores and indices reach the host, never an images x
classes matrix.

Rows are pybioclip's, row for row (tests/test_embed_scale.py checks them against the classifiers): softmax over all
classes, then the k best species; at a higher rank the species above `min_prob` summed per taxon (its whole
lineage), then the k best; bins sum their labels. Ties keep the first class, as pybioclip's stable sorts do.

    summary = predict_job(TreeOfLifeClassifier(model, txt_emb="emb/"), inputs, "pred.parquet", rank="family")
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax.errors import InputError
from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier
from bioclip_jax.inference.inputs import Inputs
from bioclip_jax.inference.jobs import (
    DEFAULT_PART_SIZE,
    EncodeFn,
    Summary,
    host_encoder,
    host_mesh,
    model_fingerprint,
    run_job,
)
from bioclip_jax.inference.model import normalize_features
from bioclip_jax.inference.outputs import FILE_COLUMN, ID_COLUMN, job_manifest
from bioclip_jax.inference.topk import DeviceBank, DeviceGroups
from bioclip_jax.inference.tree_of_life import SPECIES_LABEL, TreeOfLifeClassifier, join_names, rank_label


@dataclasses.dataclass
class ClassBank:
    """The classes on the device (`topk.DeviceBank`: rows split over the host's devices): `device` holds the text
    embeddings [C, D]; `groups` the taxon or bin of each class (numbered in order of first appearance) or None;
    `columns(j)` the output columns of result j (a class, or a group)."""
    device: DeviceBank
    groups: DeviceGroups | None
    min_prob: float | None
    columns: Callable[[int], dict]
    names: dict  # a description for the job's manifest

    @property
    def size(self) -> int:
        return self.groups.count if self.groups is not None else self.device.size

    def top_k(self, features: np.ndarray, k: int, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """pybioclip's scores of normalised image features: class probabilities, or group sums (of the classes above
        min_prob for tree-of-life ranks), the k best -> (scores [B, k], indices [B, k])."""
        if self.groups is None:
            return self.device.top_k_probs(features, k, logit_scale)
        return self.device.top_k_groups(features, k, logit_scale, self.groups, self.min_prob or 0.0)


def bank_dtype():
    """bf16 where the encoder computes in bf16 (accelerators); float32 on CPU, where bf16 is slower and rows must
    match the classifiers' exactly."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _device_bank(matrix, mesh, batch_size: int) -> DeviceBank:
    """The classifier's [D, C] text matrix as a bank of C rows, transposed on device. Its columns are already unit
    length: scores are the classifiers' own products, not re-normalised ones."""
    return DeviceBank(matrix, mesh, bank_dtype(), normalize=False, batch_size=batch_size, columns=True)


def _groups(keys: list) -> tuple[np.ndarray, list[int]]:
    """Group number per class in order of first appearance, and the first class of each group."""
    index: dict = {}
    firsts: list[int] = []
    ids = np.empty(len(keys), np.int32)
    for c, key in enumerate(keys):
        if key not in index:
            index[key] = len(firsts)
            firsts.append(c)
        ids[c] = index[key]
    return ids, firsts


def tree_of_life_bank(classifier: TreeOfLifeClassifier, rank: str = SPECIES_LABEL, min_prob: float = 1e-9,
                      mesh=None, batch_size: int = 256) -> ClassBank:
    label = rank_label(rank)
    device = _device_bank(classifier.get_txt_embeddings(), mesh, batch_size)
    names = {"txt_emb": str(classifier.tree_of_life_version), "rank": label, "classes": device.size}

    @functools.lru_cache(maxsize=65536)
    def columns(j: int) -> dict:
        return classifier.get_classification_dict(firsts[j] if firsts is not None else j, label)

    firsts = None
    if label == SPECIES_LABEL:
        return ClassBank(device, None, None, columns, names)
    keys = [join_names(classifier.get_classification_dict(c, label)) for c in range(device.size)]
    ids, firsts = _groups(keys)
    return ClassBank(device, device.put_groups(ids), min_prob, columns, {**names, "min_prob": min_prob})


def custom_labels_bank(classifier: CustomLabelsClassifier, mesh=None, batch_size: int = 256) -> ClassBank:
    device = _device_bank(classifier.txt_embeddings, mesh, batch_size)
    names = {"classes": list(classifier.classes)}
    if isinstance(classifier, CustomLabelsBinningClassifier):
        bins = [classifier.cls_to_bin[c] for c in classifier.classes]
        ids, firsts = _groups(bins)
        return ClassBank(device, device.put_groups(ids), None, lambda j: {"classification": bins[firsts[j]]},
                         {**names, "bins": [str(b) for b in bins]})
    return ClassBank(device, None, None, lambda j: {"classification": classifier.classes[j]}, names)


def prediction_rows(bank: ClassBank, logit_scale: float, k: int, column_names: list[str]):
    """The rows function of a prediction job: k rows per image (uuid, file_name, the class columns, score, carried)."""
    k = min(k, bank.size)

    def rows(features, ids, file_names, carried):
        scores, indices = bank.top_k(normalize_features(features), k, logit_scale)
        out: dict[str, list] = {}
        for b in range(len(ids)):
            for j in range(k):
                if bank.min_prob is not None and scores[b, j] <= 0:  # pybioclip: only taxa with a species above
                    break
                row = {ID_COLUMN: str(ids[b]), FILE_COLUMN: file_names[b], **bank.columns(int(indices[b, j])),
                       "score": float(scores[b, j]), **{n: carried[b].get(n) for n in column_names}}
                for name, value in row.items():
                    out.setdefault(name, []).append(value)
        return out
    return rows


def predict_job(classifier, inputs: Inputs, output: str, *, rank: str = SPECIES_LABEL, k: int | None = None,
                min_prob: float = 1e-9, batch_size: int = 32, part_size: int = DEFAULT_PART_SIZE,
                encode_fn: EncodeFn | None = None, progress: bool = True) -> Summary:
    """Classifies every input into `output` (.parquet part folder, resumable) with a classifier's model and classes:
    TreeOfLifeClassifier (at `rank`, k default 5), CustomLabelsClassifier or its binning form (k default: all).
    The images are encoded and the classes scored on this host's devices (`jobs.host_mesh`): the class bank is
    split over them. encode_fn as for `jobs.embed_job`."""
    mesh = host_mesh()
    if isinstance(classifier, TreeOfLifeClassifier):
        bank = tree_of_life_bank(classifier, rank, min_prob, mesh, batch_size)
        k = k or 5
    elif isinstance(classifier, CustomLabelsClassifier):
        bank = custom_labels_bank(classifier, mesh, batch_size)
        k = k or bank.size
    else:
        raise InputError(f"predict_job needs a TreeOfLifeClassifier or CustomLabelsClassifier, got "
                         f"{type(classifier).__name__}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    model = classifier.model
    job = job_manifest("predict", model_fingerprint(model), {"classes": bank.names, "k": k, "preprocess": repr(
        classifier.preprocess), "columns": inputs.column_names})
    rows = prediction_rows(bank, model.logit_scale, k, inputs.column_names)
    return run_job(inputs, output, job, rows, encode_fn or host_encoder(model, batch_size, mesh),
                   classifier.preprocess, batch_size, part_size, progress, model.source, formats=(".parquet",),
                   desc="predict")
