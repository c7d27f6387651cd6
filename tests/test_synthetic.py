"""The synthetic tree of life: deterministic, a complete taxonomy, a sound held-out split, informative images."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife
from bioclip_jax.data.taxonomy import RANKS, Taxon

FIELDS = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")


@pytest.fixture(scope="module")
def tree():
    return SyntheticTreeOfLife()


def pixels(tree, taxon, index):
    return np.asarray(tree.draw(taxon, index))


def test_same_config_same_names_and_pixels(tree):
    again = SyntheticTreeOfLife(SyntheticConfig())
    assert again.species == tree.species and again.heldout_species == tree.heldout_species
    for taxon in tree.species[::50]:
        for index in (0, 7):
            np.testing.assert_array_equal(pixels(again, taxon, index), pixels(tree, taxon, index))
    assert not np.array_equal(pixels(tree, tree.species[0], 0), pixels(tree, tree.species[0], 1))


def test_other_seed_differs(tree):
    other = SyntheticTreeOfLife(SyntheticConfig(seed=1))
    assert [t.taxonomic_name for t in other.species] != [t.taxonomic_name for t in tree.species]
    assert not np.array_equal(pixels(other, other.species[0], 0), pixels(tree, tree.species[0], 0))


def test_structure(tree):
    species = tree.species
    assert len(species) == 200 and all(isinstance(t, Taxon) for t in species)
    assert len({t.kingdom for t in species}) >= 4
    for t in species:
        assert all(getattr(t, f) for f in FIELDS) and t.common_name
        assert t.ranks == (t.kingdom, t.phylum, t.cls, t.order, t.family, t.genus, t.species)  # case already right
        assert re.fullmatch(r"[a-z]+", t.species) and re.fullmatch(r"[A-Z][a-z]+", t.genus)
        assert t.family.endswith(("idae", "aceae")) and t.order.endswith(("ales", "formes", "ida"))
    for depth, field in enumerate(FIELDS):
        # a name is never reused by two different taxa of the same rank
        parents = collections.defaultdict(set)
        for t in species:
            parents[getattr(t, field)].add(t.at_rank(RANKS[depth]))
        assert all(len(p) == 1 for p in parents.values()), field
    assert len({t.common_name for t in species}) == len(species)
    counts = [len({getattr(t, f) for t in species}) for f in FIELDS]
    assert counts == sorted(counts) and counts[1] > counts[0] and counts[-1] > 2 * counts[-2]


@pytest.mark.parametrize("n_species", [4, 13, 1000])
def test_sizes_follow_config(n_species):
    tree = SyntheticTreeOfLife(SyntheticConfig(n_species=n_species, image_size=32))
    assert len(tree.species) == n_species == len({t.scientific_name for t in tree.species})
    image = tree.draw(tree.species[-1], 0)
    assert image.size == (32, 32) and image.mode == "RGB"


def test_heldout_split(tree):
    seen, held = tree.seen_species, tree.heldout_species
    assert len(held) == 20 and not set(seen) & set(held) and len(seen) + len(held) == 200
    assert {t.kingdom for t in held} == {t.kingdom for t in tree.species}
    seen_genera = {t.genus for t in seen}
    assert all(t.genus in seen_genera for t in held)
    assert SyntheticTreeOfLife(SyntheticConfig(heldout_fraction=0.0)).heldout_species == []
    half = SyntheticTreeOfLife(SyntheticConfig(heldout_fraction=0.5))
    assert len(half.heldout_species) == 100 and {t.genus for t in half.seen_species} == {t.genus for t in half.species}


def test_iter_examples():
    tree = SyntheticTreeOfLife(SyntheticConfig(n_species=12, images_per_species=3, image_size=48))
    for split, taxa in (("seen", tree.seen_species), ("heldout", tree.heldout_species)):
        examples = list(tree.iter_examples(split))
        assert len(examples) == 3 * len(taxa) and [t for _, _, t in examples[::3]] == taxa
        ids = [i for i, _, _ in examples]
        assert len(set(ids)) == len(ids) and ids == [i for i, _, _ in tree.iter_examples(split)]
        example_id, image, taxon = examples[1]
        assert example_id == f"synthetic/{taxon.genus}_{taxon.species}/00001"
        assert image.size == (48, 48) and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels(tree, taxon, 1))
    with pytest.raises(ValueError):
        next(tree.iter_examples("train"))
    with pytest.raises(KeyError):
        tree.draw(Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"), 0)


def colour_features(image):
    """Joint hue x value histogram of the saturated pixels: the organism, not the muted background."""
    hsv = np.asarray(image.convert("HSV"), np.float32) / 255
    keep = hsv[..., 1] > 0.5
    bins = np.minimum(hsv[..., 0] * 24, 23).astype(int) * 4 + np.minimum(hsv[..., 2] * 4, 3).astype(int)
    hist = np.bincount(bins[keep], minlength=96).astype(np.float32)
    return hist / max(hist.sum(), 1.0)


def test_taxonomy_is_learnable_from_pixels(tree):
    """Nearest centroid on colour histograms, fit on images 0-5, tested on unseen image indices: kingdom (the palette)
    is nearly perfect, species far above chance, and siblings in a genus are told apart."""
    seen = tree.seen_species
    centroids = np.stack([np.mean([colour_features(tree.draw(t, i)) for i in range(6)], 0) for t in seen])
    tests = [(colour_features(tree.draw(t, i)), j) for j, t in enumerate(seen) for i in (1000, 1001)]
    hits = collections.Counter()
    for features, truth in tests:
        distances = ((centroids - features) ** 2).sum(1)
        pred = int(np.argmin(distances))
        hits["kingdom"] += seen[pred].kingdom == seen[truth].kingdom
        hits["species"] += pred == truth
        siblings = [k for k, t in enumerate(seen) if t.genus == seen[truth].genus]
        hits["sibling"] += siblings[int(np.argmin(distances[siblings]))] == truth
        hits["with_siblings"] += len(siblings) > 1
    n = len(tests)
    assert hits["kingdom"] / n > 0.9
    assert hits["species"] / n > 10 / len(seen)
    n_only_child = n - hits["with_siblings"]
    assert (hits["sibling"] - n_only_child) / hits["with_siblings"] > 0.75  # chance is about 0.4
