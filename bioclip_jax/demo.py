"""The quick-start job: embed a few drawn organisms and their taxonomic captions, print the similarity table.

With a randomly initialised model the similarities carry no meaning yet; the point is the whole path (drawing ->
preprocessing -> image tower, caption -> tokenizer -> text tower) running end to end on any machine.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image, ImageDraw

# (taxonomy, common name, body colour, shape) for a few organisms.
ORGANISMS = [
    (("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"), "black-billed magpie",
     (20, 20, 30), "bird"),
    (("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus"), "monarch butterfly",
     (230, 120, 20), "butterfly"),
    (("Plantae", "Tracheophyta", "Magnoliopsida", "Asterales", "Asteraceae", "Helianthus", "annuus"),
     "common sunflower", (240, 200, 30), "flower"),
    (("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria"), "fly agaric",
     (200, 30, 30), "mushroom"),
]


def draw(colour: tuple[int, int, int], shape: str, size: int = 224) -> Image.Image:
    image = Image.new("RGB", (size, size), (120, 170, 110))
    d = ImageDraw.Draw(image)
    s = size / 224
    if shape == "bird":
        d.ellipse([60 * s, 90 * s, 170 * s, 150 * s], fill=colour)
        d.ellipse([140 * s, 70 * s, 185 * s, 110 * s], fill=colour)
        d.polygon([(60 * s, 120 * s), (10 * s, 100 * s), (20 * s, 140 * s)], fill=(240, 240, 240))
    elif shape == "butterfly":
        d.ellipse([32 * s, 60 * s, 112 * s, 160 * s], fill=colour)
        d.ellipse([112 * s, 60 * s, 192 * s, 160 * s], fill=colour)
        d.rectangle([107 * s, 60 * s, 117 * s, 170 * s], fill=(10, 10, 10))
    elif shape == "flower":
        d.rectangle([108 * s, 120 * s, 116 * s, 220 * s], fill=(40, 120, 40))
        d.ellipse([52 * s, 32 * s, 172 * s, 152 * s], fill=colour)
        d.ellipse([87 * s, 67 * s, 137 * s, 117 * s], fill=(90, 50, 20))
    else:
        d.rectangle([100 * s, 120 * s, 124 * s, 200 * s], fill=(235, 230, 210))
        d.pieslice([50 * s, 60 * s, 174 * s, 180 * s], 180, 360, fill=colour)
    return image


def taxon_com(ranks: tuple[str, ...], common: str) -> str:
    return f"a photo of {' '.join(ranks)} with common name {common}."


def run_demo(model_name: str = "tiny", seed: int = 0) -> np.ndarray:
    import bioclip_jax

    start = time.perf_counter()
    model = bioclip_jax.create_model(model_name, seed=seed)
    images = [draw(colour, shape) for _, _, colour, shape in ORGANISMS]
    captions = [taxon_com(ranks, common) for ranks, common, _, _ in ORGANISMS]
    image_features, text_features = bioclip_jax.encode(model, images=images, texts=captions)
    similarity = image_features @ text_features.T
    print(f"model {model_name} (randomly initialised, seed {seed}), {model.config.embed_dim}-d embeddings")
    names = [f"{ranks[5]} {ranks[6]}" for ranks, *_ in ORGANISMS]
    width = max(len(n) for n in names)
    print(f"{'image / caption':<{width}}  " + "  ".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, similarity):
        print(f"{name:<{width}}  " + "  ".join(f"{v:>{width}.4f}" for v in row))
    print(f"cosine similarity of normalised embeddings; done in {time.perf_counter() - start:.1f} s")
    return similarity
