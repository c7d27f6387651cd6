"""Taxa and BioCLIP's text types.

The strings follow BioCLIP's TreeOfLife-10M writer (Imageomics/bioclip scripts/evobio10m/make_wds.py, naming.py):
ranks kingdom..genus are capitalised, the species epithet is lower case, missing ranks are dropped, and the common
name falls back to the scientific name, then to the taxonomic name. Training mixes sci/com/taxon/sci_com/taxon_com,
one type per global batch chosen from the step (as BioCLIP's `--text-type random`), or one per sample.

Evaluation names classes differently (`eval_class_name`, BioCLIP's src/imageomics/naming_eval.py): no fallbacks, so a
missing common name stays empty and the taxonomic name is "Genus species" when the kingdom is missing.
"""

from __future__ import annotations

import dataclasses
import random

from bioclip_jax.errors import InputError

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# The rank columns of BioCLIP's metadata.csv files ("class" is a Python keyword there too).
RANK_COLUMNS = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")
TEXT_TYPES = ("sci", "com", "taxon", "sci_com", "taxon_com", "taxonTag", "taxonTag_com")
MIXED_TEXT_TYPES = ("sci", "com", "taxon", "sci_com", "taxon_com")  # what BioCLIP samples from in training
# What BioCLIP's evaluation accepts (`--text_type`); "asis" is the task's `class` column, named by the task reader.
EVAL_TEXT_TYPES = ("asis", "sci", "com", "taxon", "sci_com", "taxon_com")


@dataclasses.dataclass(frozen=True)
class Taxon:
    """Seven ranks (species = the epithet alone, e.g. "hudsonia") and an optional English common name."""

    kingdom: str = ""
    phylum: str = ""
    cls: str = ""
    order: str = ""
    family: str = ""
    genus: str = ""
    species: str = ""
    common_name: str = ""

    @classmethod
    def from_ranks(cls, ranks, common_name: str = "") -> "Taxon":
        ranks = list(ranks)
        if len(ranks) != 7:
            raise InputError(f"expected 7 ranks (kingdom..species epithet), got {len(ranks)}: {ranks}")
        return cls(*[(r or "").strip() for r in ranks], common_name=(common_name or "").strip())

    @property
    def ranks(self) -> tuple[str, ...]:
        """The seven ranks as BioCLIP writes them ('' where missing)."""
        upper = [r.capitalize() for r in (self.kingdom, self.phylum, self.cls, self.order, self.family, self.genus)]
        return (*upper, self.species.lower())

    def at_rank(self, rank: str) -> tuple[str, ...]:
        """The lineage down to `rank` (kingdom..rank): the label of this taxon at that rank."""
        return self.ranks[:RANKS.index(rank) + 1]

    @property
    def taxonomic_name(self) -> str:
        return " ".join(r for r in self.ranks if r)

    @property
    def scientific_name(self) -> str:
        _, _, _, _, _, genus, species = self.ranks
        return " ".join(p for p in (genus, species) if p).capitalize()

    @property
    def common(self) -> str:
        """Common name with BioCLIP's fallbacks, so it is never empty for a non-empty taxon."""
        return self.common_name or self.scientific_name or self.taxonomic_name

    @property
    def tagged(self) -> str:
        return " ".join(f"{rank} {value}" for rank, value in zip(RANKS, self.ranks) if value)

    @property
    def empty(self) -> bool:
        return not any(self.ranks)

    def name(self, text_type: str) -> str:
        """The taxon's name of one text type, e.g. name("sci") -> "Pica hudsonia"."""
        names = {
            "sci": self.scientific_name, "com": self.common, "taxon": self.taxonomic_name, "taxonTag": self.tagged,
            "sci_com": f"{self.scientific_name} with common name {self.common}",
            "taxon_com": f"{self.taxonomic_name} with common name {self.common}",
            "taxonTag_com": f"{self.tagged} with common name {self.common}",
        }
        if text_type not in names:
            raise InputError(f"unknown text type {text_type!r}; expected one of {TEXT_TYPES}")
        return names[text_type]

    def text(self, text_type: str) -> str:
        """The caption of one text type, e.g. text("taxon_com")."""
        return f"a photo of {self.name(text_type)}."


def epithet(genus: str, species: str) -> str:
    """The species epithet alone, also when a binomial "Pica hudsonia" was given."""
    parts = species.split()
    if len(parts) > 1 and genus and parts[0].lower() == genus.lower():
        return " ".join(parts[1:])
    return species


def is_fallback_common(common: str, names: list[str]) -> bool:
    """BioCLIP wrote the scientific or taxonomic name into common_name.txt when there was no common name."""
    key = " ".join(common.split()).lower()
    return not key or any(key == " ".join(n.split()).lower() for n in names if n)


def row_taxon(row: dict[str, str]) -> Taxon:
    """Taxon from a metadata.csv row (optional columns kingdom..species, common_name; species may be a binomial)."""
    ranks = [(row.get(c) or "").strip() for c in RANK_COLUMNS]
    if not ranks[5] and len(ranks[6].split()) > 1 and ranks[6][:1].isupper():
        ranks[5] = ranks[6].split()[0]  # "Pica hudsonia" in the species column, no genus column
    ranks[6] = epithet(ranks[5], ranks[6])
    taxon = Taxon.from_ranks(ranks)
    common = (row.get("common_name") or "").strip()
    if is_fallback_common(common, [taxon.scientific_name, taxon.taxonomic_name]):
        common = ""
    return Taxon.from_ranks(ranks, common)


def eval_class_name(taxon: Taxon, text_type: str, subspecies: str = "") -> str:
    """The class name BioCLIP's evaluation prompts with (naming_eval), from the taxon's fields as given (not its
    training fallbacks): kingdom..genus capitalised, species and subspecies lower case.

    - sci: "Genus species[ subspecies]"; "Genus" without a species; "" without a genus either.
    - com: the common name as given, possibly "".
    - taxon: all seven ranks joined by single spaces, empty ranks included (so a missing middle rank leaves a double
      space, which the tokenizer collapses), then the subspecies; just "Genus species[ subspecies]" when the kingdom
      is missing.
    - sci_com / taxon_com: "<sci / taxon> with common name <common>", or the sci / taxon name alone without a common
      name.
    ("asis", the task's class column, is not a property of the taxon: the caller uses the label.)
    BioCLIP reads the CSV with pandas, where an empty cell is NaN and becomes the text "nan" (or breaks the
    capitalisation); empty cells are "" here.
    """
    kingdom, phylum, cls, order, family, genus = (r.capitalize() for r in (
        taxon.kingdom, taxon.phylum, taxon.cls, taxon.order, taxon.family, taxon.genus))
    species, subspecies = taxon.species.lower(), (subspecies or "").strip().lower()
    if subspecies:
        sci = f"{genus} {species} {subspecies}"
    elif species:
        sci = f"{genus} {species}"
    else:
        sci = genus
    lowest = [genus, species] + ([subspecies] if subspecies else [])
    ranks = lowest if not taxon.kingdom else [kingdom, phylum, cls, order, family] + lowest
    taxonomic = " ".join(ranks)
    common = taxon.common_name
    names = {
        "sci": sci, "com": common, "taxon": taxonomic,
        "sci_com": f"{sci} with common name {common}" if common else sci,
        "taxon_com": f"{taxonomic} with common name {common}" if common else taxonomic,
    }
    if text_type not in names:
        raise InputError(f"unknown evaluation text type {text_type!r}; expected one of {EVAL_TEXT_TYPES}")
    return names[text_type]


def text_type_for_step(step: int, choices: tuple[str, ...] = MIXED_TEXT_TYPES) -> str:
    """BioCLIP's mixed text type: one type per global batch, drawn from a RNG seeded with the step."""
    return random.Random(step).choice(choices)


def text_type_for_sample(seed: int, index: int, choices: tuple[str, ...] = MIXED_TEXT_TYPES) -> str:
    """Per-sample mixing: a type drawn independently for every example (by its global index)."""
    return random.Random(f"{seed}/{index}").choice(choices)
