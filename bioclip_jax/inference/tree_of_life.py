"""Tree-of-life prediction over a species text-embedding matrix, in pybioclip's file format.

    txt_emb_species.npy   float32 [D, N]: column i is species i's text embedding (L2-normalised)
    txt_emb_species.json  N entries [[kingdom, phylum, class, order, family, genus, species_epithet], common_name]

Species probabilities are softmax(exp(logit_scale) * image @ matrix); a higher rank's score sums the probabilities of
its species (those above `min_prob`), as pybioclip's TreeOfLifeClassifier.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from bioclip_jax.data.taxonomy import RANKS, Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.inference.classify import Predictions, load_images, zero_shot_probabilities
from bioclip_jax.inference.model import Model, as_image_list, encode
from bioclip_jax.inference.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference.zero_shot import class_embeddings, class_texts

EMBEDDINGS_FILE = "txt_emb_species.npy"
NAMES_FILE = "txt_emb_species.json"
# pybioclip's columns: the ranks up to the one asked for ("class" for the class rank); at species rank the epithet,
# "Genus epithet" as species, and the common name.
COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus")


def save_txt_emb(folder: str | os.PathLike, embeddings: np.ndarray, taxa: Sequence[Taxon]) -> Path:
    """embeddings [N, D] (one row per taxon) -> the two pybioclip files in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / EMBEDDINGS_FILE, np.ascontiguousarray(np.asarray(embeddings, np.float32).T))
    names = [[list(t.ranks), t.common_name] for t in taxa]
    (folder / NAMES_FILE).write_text(json.dumps(names))
    return folder


def load_txt_emb(folder: str | os.PathLike) -> tuple[np.ndarray, list[Taxon]]:
    """-> (matrix [D, N] float32, taxa). Files are validated against each other."""
    folder = Path(folder)
    for name in (EMBEDDINGS_FILE, NAMES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (expected pybioclip's {EMBEDDINGS_FILE} + {NAMES_FILE})")
    matrix = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)  # never unpickle: plain arrays only
    names = json.loads((folder / NAMES_FILE).read_text())
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
        raise InputError(f"{folder / EMBEDDINGS_FILE}: shape {matrix.shape}, expected [D, {len(names)}] to match "
                         f"the {len(names)} names of {NAMES_FILE}")
    taxa = []
    for i, entry in enumerate(names):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and len(entry[0]) == 7):
            raise InputError(f"{folder / NAMES_FILE}: entry {i} is {entry!r}; expected [[7 ranks], common_name]")
        taxa.append(Taxon.from_ranks(entry[0], entry[1] or ""))
    return matrix.astype(np.float32, copy=False), taxa


def make_txt_emb(model: Model, taxa: Sequence[Taxon], folder: str | os.PathLike, text_type: str = "taxon_com",
                 templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, chunk: int = 256) -> Path:
    """Embeds every taxon (its `text_type` name in every template, averaged) and writes pybioclip's files."""
    names = class_texts(list(taxa), text_type)
    rows = []
    for start in tqdm(range(0, len(names), chunk), desc="species text embeddings", unit="chunk"):
        rows.append(class_embeddings(model, [[t.format(n) for t in templates] for n in names[start:start + chunk]]))
    return save_txt_emb(folder, np.concatenate(rows), taxa)


def _row(taxon: Taxon, rank: str) -> dict:
    depth = RANKS.index(rank)
    kingdom_to_genus = dict(zip(COLUMNS, taxon.ranks[:6]))
    if rank != "species":
        return {c: kingdom_to_genus[c] for c in COLUMNS[:depth + 1]}
    genus, epithet = taxon.ranks[5], taxon.ranks[6]
    return {**kingdom_to_genus, "species_epithet": epithet, "species": f"{genus} {epithet}",
            "common_name": taxon.common_name}


class TreeOfLifeClassifier:
    def __init__(self, model: Model, txt_emb: str | os.PathLike):
        self.model = model
        self.matrix, self.taxa = load_txt_emb(txt_emb)
        if self.matrix.shape[0] != model.config.embed_dim:
            raise InputError(f"{txt_emb}: text embeddings have dimension {self.matrix.shape[0]}, but the model embeds "
                             f"to {model.config.embed_dim}: they were made with another model")
        self._matrix, self._taxa = self.matrix, self.taxa  # the candidates: all species, or restrict()'s subset

    def restrict(self, rank: str, names: Sequence[str]) -> int:
        """Keeps only species whose `rank` is one of `names` (pybioclip's --subset); returns how many remain."""
        if rank not in RANKS:
            raise InputError(f"rank {rank!r}: expected one of {RANKS}")
        wanted = {n.strip().lower() for n in names}
        index = RANKS.index(rank)
        keep = np.array([t.ranks[index].lower() in wanted for t in self.taxa])
        if not keep.any():
            raise InputError(f"no species has {rank} in {sorted(wanted)[:10]}")
        self._matrix = self.matrix[:, keep]
        self._taxa = [t for t, kept in zip(self.taxa, keep) if kept]
        return len(self._taxa)

    def predict(self, images, rank: str = "species", min_prob: float = 1e-9, k: int = 5,
                batch_size: int = 10) -> Predictions:
        if rank not in RANKS:
            raise InputError(f"rank {rank!r}: expected one of {RANKS}")
        keys, loaded, failures = load_images(as_image_list(images))
        rows: list[dict] = []
        if loaded:
            features = encode(self.model, images=loaded, batch_size=batch_size)
            probs = zero_shot_probabilities(self.model, features, self._matrix)
            for key, p in zip(keys, probs):
                rows += self._rows(key, p, self._taxa, rank, min_prob, k)
        return Predictions(rows, failures)

    @staticmethod
    def _rows(key: str, probs: np.ndarray, taxa: list[Taxon], rank: str, min_prob: float, k: int) -> list[dict]:
        if rank == "species":
            best = np.argsort(-probs)[:k]
            return [{"file_name": key, **_row(taxa[i], rank), "score": float(probs[i])} for i in best]
        totals: dict[tuple, float] = collections.defaultdict(float)
        labels: dict[tuple, dict] = {}
        for i in np.flatnonzero(probs > min_prob):
            row = _row(taxa[i], rank)
            name = tuple(row.values())
            totals[name] += float(probs[i])
            labels[name] = row
        best = sorted(totals, key=lambda n: -totals[n])[:k]
        return [{"file_name": key, **labels[n], "score": totals[n]} for n in best]
