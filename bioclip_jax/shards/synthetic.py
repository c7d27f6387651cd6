"""The synthetic tree of life (bioclip_jax.data.synthetic) as a make-shards source: OUT/train and OUT/val hold the
seen species (`val_per_species` images of each in val, at most all but one, chosen by a hash of (seed, id)), and
OUT/heldout every image of the held-out species."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os

from PIL import Image
from tqdm.auto import tqdm

from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.data.transforms import to_rgb
from bioclip_jax.shards.build import Example
from bioclip_jax.shards.source import ItemSource, Plan, read_at

SPOOL = ".synthetic.spool"


class SyntheticTree(ItemSource):
    """The generator is one sequential iterator, so planning draws every image once into a spool file (its RGB pixels,
    so the records are those of the drawn images); the workers then encode and write them. `generator` replaces
    SyntheticTreeOfLife(config) by any object with `iter_examples(split)` -> (id, PIL image, Taxon) and optionally
    `.config`."""

    name = "synthetic"
    records_per_shard = 1000
    workers = 1

    def __init__(self, config: SyntheticConfig | None = None, *, val_per_species: int = 2, generator=None):
        if generator is None:
            config = config or SyntheticConfig()
            generator = SyntheticTreeOfLife(config)
        self.config = config or getattr(generator, "config", None)
        self.val_per_species = val_per_species
        self.spool = ""
        self._generator = generator  # used by plan() only, then dropped: never pickled into jobs

    def settings(self) -> dict:
        config = self.config
        inputs = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
        return {"inputs": inputs, "val_per_species": self.val_per_species}

    def plan(self, out: str, *, workers: int, progress: bool) -> Plan:
        self.spool = os.path.join(out, SPOOL)
        generator, self._generator = self._generator, None
        items: dict[str, list] = {"seen": [], "heldout": []}
        skipped: dict[str, list] = {"train": [], "val": [], "heldout": []}
        seen_ids: set[str] = set()
        with open(self.spool, "wb") as f, tqdm(unit="img", desc="drawing synthetic images",
                                               disable=not progress) as bar:
            for split in items:
                for example_id, image, taxon in generator.iter_examples(split):
                    bar.update()
                    if example_id in seen_ids:
                        skipped["train" if split == "seen" else split].append(
                            {"name": example_id, "reason": "duplicate id", "detail": ""})
                        continue
                    seen_ids.add(example_id)
                    image = to_rgb(image)  # what encoding starts with: the same JPEG from the spooled pixels
                    pixels = image.tobytes()  # raw, not PNG: compressing would cost more than drawing
                    items[split].append((example_id, f.tell(), len(pixels), list(dataclasses.astuple(taxon)[:7]),
                                         taxon.common_name, image.size))
                    f.write(pixels)
        val_ids = self._val_ids(items["seen"])
        groups = {"train": [[it for it in items["seen"] if it[0] not in val_ids]],
                  "val": [[it for it in items["seen"] if it[0] in val_ids]], "heldout": [items["heldout"]]}
        return Plan(groups, skipped, scratch=[self.spool])

    def _val_ids(self, seen: list) -> set[str]:
        seed = getattr(self.config, "seed", 0)
        by_species: dict[tuple, list] = collections.defaultdict(list)
        for item in seen:
            by_species[tuple(item[3])].append(item[0])
        val_ids = set()
        for ids in by_species.values():
            ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())
            val_ids.update(ranked[:max(0, min(self.val_per_species, len(ids) - 1))])
        return val_ids

    def load(self, item, files: dict) -> Example:
        example_id, offset, nbytes, ranks, common, size = item
        image = Image.frombytes("RGB", size, read_at(files, self.spool, offset, nbytes))
        return Example(example_id, image, Taxon.from_ranks(ranks, common))

    def name_of(self, item) -> str:
        return item[0]
