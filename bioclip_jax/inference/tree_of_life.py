"""Tree-of-life prediction over a species text-embedding matrix, in pybioclip's file format.

    txt_emb_species.npy   float32 [D, N]: column i is species i's text embedding (L2-normalised)
    txt_emb_species.json  N entries [[kingdom, phylum, class, order, family, genus, species_epithet], common_name]

Species probabilities are softmax(exp(logit_scale) * image @ matrix); a higher rank's score sums the probabilities of
its species (those above `min_prob`), as pybioclip's TreeOfLifeClassifier. Rows carry the names exactly as the JSON
stores them.
"""

from __future__ import annotations

import collections
import enum
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from bioclip_jax import paths
from bioclip_jax.convert.hub import resolve_txt_emb
from bioclip_jax.data.taxonomy import RANKS, Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.inference.classify import BIOCLIP_MODEL_STR, DEFAULT_BATCH_SIZE, BaseClassifier, recorded_images
from bioclip_jax.inference.io import read_subset
from bioclip_jax.inference.model import Model, as_image_list
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
    paths.make_dirs(folder)
    np.save(folder / EMBEDDINGS_FILE, np.ascontiguousarray(np.asarray(embeddings, np.float32).T))
    names = [[list(t.ranks), t.common_name] for t in taxa]
    (folder / NAMES_FILE).write_text(json.dumps(names))
    return folder


def read_txt_names(folder: str | os.PathLike) -> list[list]:
    """txt_emb_species.json as stored: [[kingdom, ..., genus, species_epithet], common_name] per species."""
    path = Path(folder) / NAMES_FILE
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not UTF-8 JSON ({e})") from None
    for i, entry in enumerate(names if isinstance(names, list) else [names]):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and len(entry[0]) == 7):
            raise InputError(f"{path}: entry {i} is {entry!r}; expected [[7 ranks], common_name]")
    return names


def load_txt_matrix(folder: str | os.PathLike) -> tuple[np.ndarray, list[list]]:
    """-> (matrix [D, N] float32, the names as stored). Files are validated against each other."""
    folder = Path(folder)
    for name in (EMBEDDINGS_FILE, NAMES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (expected pybioclip's {EMBEDDINGS_FILE} + {NAMES_FILE})")
    matrix = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)  # never unpickle: plain arrays only
    names = read_txt_names(folder)
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
        raise InputError(f"{folder / EMBEDDINGS_FILE}: shape {matrix.shape}, expected [D, {len(names)}] to match "
                         f"the {len(names)} names of {NAMES_FILE}")
    return matrix.astype(np.float32, copy=False), names


def load_txt_emb(folder: str | os.PathLike) -> tuple[np.ndarray, list[Taxon]]:
    """-> (matrix [D, N] float32, taxa)."""
    matrix, names = load_txt_matrix(folder)
    return matrix, [Taxon.from_ranks(ranks, common or "") for ranks, common in names]


def unique_taxa(taxa: Sequence[Taxon]) -> list[Taxon]:
    """Each taxon once (the same lineage, as BioCLIP writes it, and the same common name), in order of first
    appearance: a CSV with one row per image names each species many times, and a species held in several columns
    of the matrix splits its probability between them."""
    seen: dict[tuple, Taxon] = {}
    for taxon in taxa:
        seen.setdefault((taxon.ranks, taxon.common_name), taxon)
    return list(seen.values())


def make_txt_emb(model: Model, taxa: Sequence[Taxon], folder: str | os.PathLike, text_type: str = "taxon_com",
                 templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, chunk: int = 256) -> Path:
    """Embeds every taxon (its `text_type` name in every template, averaged) and writes pybioclip's files, one column
    per taxon (`unique_taxa`: repeated rows are merged)."""
    paths.make_dirs(Path(folder))  # before the embedding, which takes minutes for the whole tree of life
    taxa = unique_taxa(taxa)
    names = class_texts(list(taxa), text_type)
    rows = []
    for start in tqdm(range(0, len(names), chunk), desc="species text embeddings", unit="chunk"):
        rows.append(class_embeddings(model, [[t.format(n) for t in templates] for n in names[start:start + chunk]]))
    return save_txt_emb(folder, np.concatenate(rows), taxa)


class Rank(enum.Enum):
    """pybioclip's ranks (same names and values); classifiers also take the strings "kingdom" ... "species"."""
    KINGDOM = 0
    PHYLUM = 1
    CLASS = 2
    ORDER = 3
    FAMILY = 4
    GENUS = 5
    SPECIES = 6

    def get_label(self) -> str:
        return self.name.lower()


def get_rank_labels() -> list[str]:
    """["kingdom", ..., "species"], as pybioclip."""
    return [rank.get_label() for rank in Rank]


def rank_label(rank: Rank | str | enum.Enum) -> str:
    """"species" for Rank.SPECIES, pybioclip's own Rank.SPECIES or the string (any case)."""
    label = rank.name.lower() if isinstance(rank, enum.Enum) else str(rank).strip().lower()
    if label not in RANKS:
        raise InputError(f"rank {rank!r}: expected a Rank or one of {', '.join(RANKS)}")
    return label


SPECIES_LABEL = "species"
SPECIES_EPITHET_LABEL = "species_epithet"
COMMON_NAME_LABEL = "common_name"


def get_tol_classification_labels(rank: Rank | str) -> list[str]:
    """pybioclip's row columns at `rank`: the ranks up to it; at species rank with species_epithet before species
    and common_name after it."""
    depth = RANKS.index(rank_label(rank))
    labels = list(COLUMNS[:depth + 1])
    if depth == len(COLUMNS):
        labels += [SPECIES_EPITHET_LABEL, SPECIES_LABEL, COMMON_NAME_LABEL]
    return labels


def create_classification_dict(names: list, rank: Rank | str) -> dict:
    """pybioclip's columns for one species at `rank`, with the strings as stored; species is "Genus epithet"."""
    ranks, common = names
    values = {SPECIES_EPITHET_LABEL: ranks[6], SPECIES_LABEL: f"{ranks[5]} {ranks[6]}", COMMON_NAME_LABEL: common}
    return {label: values[label] if label in values else ranks[i]
            for i, label in enumerate(get_tol_classification_labels(rank))}


def join_names(classification_dict: dict) -> str:
    return " ".join(classification_dict.values())


SPECIES_COLUMNS = [*COLUMNS, SPECIES_EPITHET_LABEL, SPECIES_LABEL, COMMON_NAME_LABEL]


def label_data(names: list[list]) -> list[dict]:
    """Every species' columns at species rank: what pybioclip's list-tol-taxa prints (columns SPECIES_COLUMNS)."""
    return [create_classification_dict(entry, Rank.SPECIES) for entry in names]


class TreeOfLifeClassifier(BaseClassifier):
    """pybioclip's TreeOfLifeClassifier: softmax over every species' text embedding; a higher rank sums its species'
    probabilities (those above `min_prob`). The species matrix is `txt_emb` (a folder with txt_emb_species.npy and
    .json) or, for the BioCLIP releases (bioclip, bioclip-2, hf-hub:imageomics/...), the one pybioclip downloads."""

    def __init__(self, model_str: str | os.PathLike | Model | None = BIOCLIP_MODEL_STR,
                 pretrained_str: str | None = None, device=None, *, txt_emb: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(model_str, pretrained_str, device, **kwargs)
        self.txt_emb = Path(txt_emb if txt_emb is not None else resolve_txt_emb(self.model_str))
        # What a prediction log names as the species embeddings: pybioclip's dataset repository, or the folder given.
        self.tree_of_life_version = os.fspath(txt_emb) if txt_emb is not None else self.get_tol_repo_id()
        self.txt_embeddings, self.txt_names = load_txt_matrix(self.txt_emb)
        if self.txt_embeddings.shape[0] != self.model.config.embed_dim:
            raise InputError(f"{self.txt_emb}: text embeddings have dimension {self.txt_embeddings.shape[0]}, but "
                             f"the model embeds to {self.model.config.embed_dim}: they were made with another model")
        self._subset: np.ndarray | None = None  # indices of the species kept by apply_filter

    def get_cached_datafile(self, filename: str) -> str:
        """The species files come from this classifier's `txt_emb` folder (the hub's, or the one given)."""
        return str(self.txt_emb / os.path.basename(filename))

    def get_txt_embeddings(self) -> np.ndarray:
        return self.txt_embeddings if self._subset is None else self.txt_embeddings[:, self._subset]

    def get_current_txt_names(self) -> list[list]:
        return self.txt_names if self._subset is None else [self.txt_names[i] for i in self._subset]

    def get_classification_dict(self, idx: int, rank: Rank | str) -> dict:
        return create_classification_dict(self.get_current_txt_names()[idx], rank)

    def get_label_data(self):
        """Every species' columns at species rank as a pandas DataFrame (pybioclip's, column for column)."""
        import pandas as pd  # only this method and create_taxa_filter need pandas

        return pd.DataFrame(label_data(self.txt_names), copy=True)

    def create_taxa_filter(self, rank: Rank | str, user_values: Sequence[str]):
        """A boolean pandas Series, one per species: has it one of `user_values` at `rank` (binomials at species
        rank)? Unknown values are pybioclip's ValueError naming them."""
        import pandas as pd

        column = rank_label(rank)
        label_data_df = self.get_label_data()
        values = pd.Series(user_values, name=column, dtype=object)
        unknown = values[~values.isin(label_data_df[column])]
        if not unknown.empty:
            raise InputError(f"Unknown {column} received: {', '.join(map(str, unknown.values))}. "
                             f"Only known {column} may be used.")
        return label_data_df[column].isin(values)

    def create_taxa_filter_from_csv(self, csv_path: str | os.PathLike):
        """pybioclip's --subset: the first column's header names the rank, its rows the taxa to keep."""
        rank, values = read_subset(csv_path)
        return self.create_taxa_filter(rank, values)

    def apply_filter(self, keep_labels_ary: Sequence[bool]) -> None:
        """Keeps only the species marked True (see `create_taxa_filter`)."""
        if len(keep_labels_ary) != len(self.txt_names):
            raise InputError(f"Invalid keep_embeddings values. This parameter should be a list containing "
                             f"{len(self.txt_names)} items.")
        keep = np.flatnonzero(np.asarray(keep_labels_ary, bool))
        if not len(keep):
            raise InputError("the filter keeps no species")
        self._subset = keep

    def format_species_probs(self, image_key: str, probs: np.ndarray, k: int = 5) -> list[dict]:
        """The `k` most probable species' rows, best first."""
        best = np.argsort(-probs, kind="stable")[:k]
        return [{"file_name": image_key, **self.get_classification_dict(i, Rank.SPECIES), "score": float(probs[i])}
                for i in best]

    def format_grouped_probs(self, image_key: str, probs: np.ndarray, rank: Rank | str, min_prob: float = 1e-9,
                             k: int = 5) -> list[dict]:
        """The `k` most probable taxa at `rank`, each the sum of its species above `min_prob`, best first."""
        totals: dict[str, float] = collections.defaultdict(float)
        labels: dict[str, dict] = {}
        for i in np.flatnonzero(probs > min_prob):
            row = self.get_classification_dict(i, rank)
            name = join_names(row)  # pybioclip's key: a taxon is its whole lineage
            totals[name] += float(probs[i])
            labels[name] = row
        best = sorted(totals, key=lambda n: -totals[n])[:k]  # stable: ties keep first-seen order, as heapq.nlargest
        return [{"file_name": image_key, **labels[n], "score": totals[n]} for n in best]

    def predict(self, images, rank: Rank | str = Rank.SPECIES, min_prob: float = 1e-9, k: int | None = 5,
                batch_size: int = DEFAULT_BATCH_SIZE, callback: Callable[[int, int], None] | None = None) -> list[dict]:
        """Rows {"file_name", ranks..., "score"}, best first, `k` per image (pybioclip's columns)."""
        label = rank_label(rank)
        images = as_image_list(images)
        rows: list[dict] = []
        for key, probs in self.iter_probabilities(images, self.get_txt_embeddings(), batch_size, callback):
            if label == SPECIES_LABEL:
                rows += self.format_species_probs(key, probs, k or 5)
            else:
                rows += self.format_grouped_probs(key, probs, label, min_prob, k or 5)
        self.record_event(images=recorded_images(images), rank=label, min_prob=min_prob, k=k, batch_size=batch_size)
        return rows


def predict_classification(img, rank: Rank | str, device=None, min_prob: float = 1e-9, k: int = 5) -> list[dict]:
    """pybioclip's one-call tree-of-life prediction for one image with its default model."""
    return TreeOfLifeClassifier(device=device).predict([img], rank, min_prob, k)
