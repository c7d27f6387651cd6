"""A deterministic synthetic tree of life: the embedded default data of the demo and the tests.

Every species has all seven ranks and an English common name, and every rank controls what its organisms look like, so
that a tiny CLIP can learn the hierarchy from pixels and text alone. Higher ranks change big, global properties that
survive a 64 x 64 downsample; lower ranks change small ones, as in real taxonomy where siblings differ in details:

    kingdom  colour palette: the body hue (kingdoms are spread evenly around the colour wheel) and a dark or pale accent
    phylum   body plan: bilateral (oval body + head), radial (star), branching (trunk + branches) or blob (amoeboid)
    class    body texture: stripes, spots, rings or checks, drawn in the accent colour
    order    appendages: legs, wings, antennae ("horns") or a tail fan, and how many
    family   proportions: elongation of the body (at equal area) and head size
    genus    pattern orientation relative to the body axis and a hue shift of up to +-0.05 (18 degrees)
    species  pattern density, a hue shift of up to +-0.03 and a small marking (none, eye spots, tip, collar)

Hue shifts of genus + species stay within +-0.08 while kingdoms are 0.25 apart, so the palette never crosses kingdoms.
Sibling taxa always differ (traits are indexed by the position among siblings), and the common name is built from the
same traits ("eyed striped scarlet-winged glimmerfly"), so common-name captions carry the same information as pixels.

An organism is rendered once per species at twice the image size, in a canonical pose; each image then rotates, scales
and moves it over a random background (flat, gradient or blotchy noise) with lighting jitter and pixel noise, all drawn
from a generator seeded by (seed, species, image index). No mirror flips: they would confuse pattern orientations.
"""

from __future__ import annotations

import collections
import colorsys
import dataclasses
import itertools
import math
import random
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError

N_KINGDOMS = 4
PLANS = ("bilateral", "radial", "branching", "blob")
TEXTURES = ("striped", "spotted", "ringed", "checkered")
APPENDAGES = ("legged", "winged", "horned", "tailed")
MARKINGS = ("", "eyed", "bright-tipped", "collared")
_ENDINGS = (("alia", "ota", "ae"), ("phyta", "ozoa", "ata", "opoda"), ("opsida", "ia", "phyceae", "ea"),
            ("ales", "formes", "ida"), ("idae", "aceae"), ("us", "a", "ium", "ops", "ella", "is"),
            ("ensis", "ata", "icus", "oides", "ii", "ifera", "alis", "ula"))  # by rank, kingdom..species
_ONSETS = "b c d f g l m n p r s t v z br cr dr gl pl st th ph ch tr".split()
_VOWELS = "a e i o u a e i o y ae".split()
_CODAS = "r n l s t d m x".split()
_NOUN_ROOTS = ("glimmer dusk thorn marsh ember frost moss reed stone sun moon mist brook fire ash dew sand tide fog "
               "briar wisp gale cinder loam ridge glade bramble spark drift shade storm flint").split()
_NOUN_ENDS = {"bilateral": ("fly", "beetle", "moth", "crawler"), "radial": ("star", "bloom", "urchin", "wheel"),
              "branching": ("wort", "weed", "fern", "coral"), "blob": ("puff", "cap", "jelly", "slime")}
_COLOURS = ("red scarlet orange amber yellow lime chartreuse grass green emerald jade teal cyan sky azure cobalt blue "
            "indigo violet purple magenta orchid rose crimson").split()  # every 15 degrees of hue
_QUALIFIERS = ("lesser", "greater", "northern", "southern", "eastern", "western", "dwarf", "giant", "common", "false")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic tree of life's size. Everything else (lineages, names, drawings) follows from the seed."""

    seed: int = 0
    n_species: int = 200
    images_per_species: int = 20
    image_size: int = 64  # pixels per side of every drawing
    heldout_fraction: float = 0.1  # share of species never trained on (the "heldout" split)


@dataclasses.dataclass(frozen=True)
class _Traits:
    index: int  # position in the species list: part of every image's random seed
    kingdom: int
    hue: float
    accent_dark: bool
    plan: str
    shape_seed: int
    texture: str
    appendage: str
    n_appendages: int
    elongation: float
    head: float
    angle: float
    period: float
    marking: str


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where an organism's parts go on its canvas of r x r pixels (u: one pixel of a 128 px canvas)."""
    r: int
    u: float
    a: float  # body half length
    b: float  # body half width
    hr: float  # head radius
    cx: float  # body centre
    cy: float
    hx: float  # head centre
    front: float  # the body's front edge
    ey: float  # half height: appendages start beyond it

    @classmethod
    def of(cls, t: _Traits, r: int) -> "_Geometry":
        u = r / 128
        a, b = 22 * u * math.sqrt(t.elongation), 22 * u / math.sqrt(t.elongation)  # equal area, different shape
        radial = t.plan == "radial"
        hr = t.head * b * (0.6 if radial else 1.0)  # a radial head is the central disc: keep the rays visible
        cx, cy = r / 2 - (0 if radial else 0.6 * hr), r / 2
        hx = cx if radial else cx + a + 0.2 * hr  # the head sticks out in front, so its size reads at 64 px
        front = cx + a if radial else hx + hr
        ey = b * {"radial": 1.2, "branching": 2.1}.get(t.plan, 1.0)
        return cls(r, u, a, b, hr, cx, cy, hx, front, ey)


def _draw_appendages(draw: ImageDraw.ImageDraw, t: _Traits, g: _Geometry, accent: tuple) -> None:
    """Wings, legs, antennae ("horns") or a tail fan, drawn before the body so it covers their roots."""
    u, a, cx, cy, ey, n = g.u, g.a, g.cx, g.cy, g.ey, t.n_appendages
    limb, w = _hsv(t.hue, 0.6, 0.3) + (255,), max(1, round(3 * u))
    if t.appendage == "winged":  # wings under the body, pale and translucent
        for i in range(1 + n):
            x0 = cx + 0.15 * a - i * 14 * u
            for sy in (-1, 1):
                y0 = cy + sy * (ey + 9 * u)
                draw.ellipse((x0 - 9 * u, y0 - 11 * u, x0 + 9 * u, y0 + 11 * u), fill=(*accent, 200))
    elif t.appendage == "legged":
        for x in np.linspace(-0.55 * a, 0.45 * a, 2 + n):
            for sy in (-1, 1):
                knee = (cx + x - 4 * u, cy + sy * (ey + 9 * u))
                draw.line([(cx + x, cy + sy * 0.6 * ey), knee, (knee[0] - 7 * u, knee[1] + sy * 7 * u)], limb, w)
    elif t.appendage == "horned":
        for i in range(2 + 2 * n):
            dy = (i // 2 + 1) * 7 * u * (1 if i % 2 else -1)
            tip = (g.front + 14 * u, cy + dy)
            draw.line([(g.front - 4 * u, cy + dy / 4), tip], limb, w)
            draw.ellipse((tip[0] - 3 * u, tip[1] - 3 * u, tip[0] + 3 * u, tip[1] + 3 * u), fill=limb)
    else:  # tail fan of 3 or 5 fins
        for ang in np.linspace(-50, 50, 3 + 2 * n) * math.pi / 180:
            base_x = cx - 0.85 * a
            tip = (base_x - 18 * u * math.cos(ang), cy + 18 * u * math.sin(ang))
            side = (4 * u * math.sin(ang), 4 * u * math.cos(ang))
            draw.polygon([(base_x + side[0], cy + side[1]), (base_x - side[0], cy - side[1]), tip], fill=limb)


def _body_mask(t: _Traits, g: _Geometry) -> Image.Image:
    """The body plan's silhouette (255 inside)."""
    a, b, cx, cy = g.a, g.b, g.cx, g.cy
    mask = Image.new("L", (g.r, g.r), 0)
    md = ImageDraw.Draw(mask)
    if t.plan == "bilateral":
        md.ellipse((cx - a, cy - b, cx + a, cy + b), fill=255)
    elif t.plan == "radial":  # a star of 5-7 rays, stretched by the elongation
        rays = 5 + t.shape_seed % 3
        pts = [(cx + a * 1.2 * f * math.cos(q), cy + b * 1.2 * f * math.sin(q))
               for i in range(2 * rays) for q, f in [(math.pi * i / rays, 1.0 if i % 2 == 0 else 0.5)]]
        md.polygon(pts, fill=255)
    elif t.plan == "branching":
        md.line([(cx - a, cy), (cx + a, cy)], 255, round(0.7 * b))
        for x in np.linspace(-0.7 * a, 0.3 * a, 3):
            for sy in (-1, 1):  # forked branches with a round leaf at each tip
                tip = (cx + x + 0.45 * a, cy + sy * 1.7 * b)
                md.line([(cx + x, cy), tip], 255, round(0.4 * b))
                md.ellipse((tip[0] - 0.45 * b, tip[1] - 0.45 * b, tip[0] + 0.45 * b, tip[1] + 0.45 * b), 255)
    else:  # blob: a wobbly ellipse, its wobble fixed per phylum
        ph = random.Random(t.shape_seed).uniform(0, 2 * math.pi)
        qs = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        m = 1 + 0.15 * np.sin(3 * qs + ph) + 0.08 * np.sin(5 * qs - ph)
        pts = list(zip(cx + a * m * np.cos(qs), cy + b * m * np.sin(qs)))
        md.polygon(pts, fill=255)
    return mask


def _spread(j: int, n: int, amplitude: float) -> float:
    """Sibling j of n placed evenly on [-amplitude, amplitude] (0 for an only child)."""
    return amplitude * (2 * j / (n - 1) - 1) if n > 1 else 0.0


def _split(q: int, n: int) -> list[int]:
    return [q // n + (1 if i < q % n else 0) for i in range(n)]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


class SyntheticTreeOfLife:
    """The species (with held-out split) of one config, and their images drawn on demand."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig()):
        if config.n_species < N_KINGDOMS:
            raise InputError(f"n_species must be at least {N_KINGDOMS}, got {config.n_species}")
        self.config = config
        self._rng = random.Random(f"synthetic/{config.seed}")
        self._used: list[set[str]] = [set() for _ in range(8)]  # names taken per rank (+ common names)
        self._names: dict[tuple, str] = {}  # (rank depth, node id) -> Latin name; ("noun", order) -> noun
        self._species: list[Taxon] = []
        self._traits: dict[Taxon, _Traits] = {}
        self._grow(0, config.n_species, [], [0] * 7)
        self._heldout = self._choose_heldout()
        self._cache: dict[Taxon, Image.Image] = {}
        r = 2 * config.image_size  # canonical render size: 2x supersampling smooths PIL's aliased shapes
        self._yy, self._xx = np.mgrid[0:r, 0:r].astype(np.float32) - r / 2
        self._gy, self._gx = self._yy[::2, ::2] / config.image_size, self._xx[::2, ::2] / config.image_size  # [-1, 1)

    # ---- taxonomy -------------------------------------------------------------------------------------------------
    def _grow(self, depth: int, quota: int, lineage: list, counters: list[int]) -> None:
        """Split `quota` species down the ranks; about 3 species per genus and at least 2 children where possible."""
        if depth == 6:
            for j in range(quota):
                self._add_species(lineage + [(counters[6], j, quota)])
                counters[6] += 1
            return
        if depth == 0:
            n = N_KINGDOMS
        else:
            n = 1 if quota < 4 else max(2, round((quota / 3) ** (1 / (6 - depth))))
        for j, q in enumerate(_split(quota, n)):
            gid = counters[depth]
            counters[depth] += 1
            self._grow(depth + 1, q, lineage + [(gid, j, n)], counters)

    def _root(self) -> str:
        syllables = self._rng.choice((2, 2, 3))
        return "".join(self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) for _ in range(syllables))

    def _latin(self, depth: int, gid: int) -> str:
        if (depth, gid) not in self._names:
            rng = self._rng
            while True:
                root, ending = self._root(), rng.choice(_ENDINGS[depth])
                if ending[0] in "aeiouy":  # a consonant between root and ending: "Bola" + "n" + "idae"
                    root += rng.choice(_CODAS)
                name = root + ending
                name = name.lower() if depth == 6 else name.capitalize()
                if name not in self._used[depth]:
                    break
            self._used[depth].add(name)
            self._names[depth, gid] = name
        return self._names[depth, gid]

    def _add_species(self, lineage: list[tuple[int, int, int]]) -> None:
        (k, _, _), (p, pj, _), (c, cj, _), (o, oj, _), (f, fj, fn), (g, gj, gn), (s, sj, sn) = lineage
        hue = (k / N_KINGDOMS + 0.02) + _spread(gj, gn, 0.05) + _spread(sj, sn, 0.03)
        t = _Traits(
            index=len(self._species), kingdom=k, hue=hue % 1.0, accent_dark=k % 2 == 0,
            plan=PLANS[(k + pj) % 4], shape_seed=p,  # parent offsets: siblings differ, cousins vary
            texture=TEXTURES[(p + cj) % 4],
            appendage=APPENDAGES[(c + oj) % 4], n_appendages=(o // 4) % 2,
            elongation=1.0 + 1.2 * fj / (fn - 1) if fn > 1 else 1.0 + 0.6 * (f % 2),
            head=(0.6, 0.35)[fj % 2] if fn > 1 else (0.6, 0.35)[f % 2],
            angle=(0.0, 90.0, 45.0, 135.0)[(f + gj) % 4],
            period=(9.0, 12.0)[(g + gj) % 2] * (1.0, 0.72, 1.35, 0.85)[sj % 4], marking=MARKINGS[sj % 4])
        names = [self._latin(d, gid) for d, (gid, _, _) in enumerate(lineage)]
        taxon = Taxon(*names, common_name=self._common_name(t, o))
        self._species.append(taxon)
        self._traits[taxon] = t

    def _common_name(self, t: _Traits, order: int) -> str:
        if ("noun", order) not in self._names:  # one noun per order: "glimmer" + "fly"
            free = [r for r in _NOUN_ROOTS if r not in self._used[7]]
            root = self._rng.choice(free) if free else self._root()
            self._used[7].add(root)
            self._names["noun", order] = root + _NOUN_ENDS[t.plan][order % 4]
        colour = _COLOURS[int(round(t.hue * 24)) % 24]
        base = " ".join(w for w in (t.marking, t.texture, f"{colour}-{t.appendage}", self._names["noun", order]) if w)
        shape = "slender" if t.elongation > 1.5 else "stout"
        names = itertools.chain([base], (f"{q} {base}" for q in (shape, *_QUALIFIERS)),
                                (f"{base} {i}" for i in itertools.count(2)))
        name = next(x for x in names if x not in self._used[7])  # unique, so "com" captions tell species apart
        self._used[7].add(name)
        return name

    def _choose_heldout(self) -> set[Taxon]:
        """Round-robin over kingdoms; prefer genera that keep a seen species and have none held out yet."""
        frac, n = self.config.heldout_fraction, len(self._species)
        n_hold = 0 if frac <= 0 else min(n - 1, max(N_KINGDOMS, round(frac * n)))
        rng = random.Random(f"synthetic/{self.config.seed}/heldout")
        by_kingdom = [[x for x in self._species if self._traits[x].kingdom == k] for k in range(N_KINGDOMS)]
        for members in by_kingdom:
            rng.shuffle(members)
        seen = collections.Counter(x.genus for x in self._species)
        held: set[Taxon] = set()
        genera_held: set[str] = set()
        while len(held) < n_hold:
            for members in by_kingdom:
                if members and len(held) < n_hold:  # min() is stable, so ties go by the shuffled order
                    pick = min(members, key=lambda x: (seen[x.genus] < 2, x.genus in genera_held))
                    members.remove(pick)
                    held.add(pick)
                    genera_held.add(pick.genus)
                    seen[pick.genus] -= 1
        return held

    @property
    def species(self) -> list[Taxon]:
        return list(self._species)

    @property
    def seen_species(self) -> list[Taxon]:
        return [x for x in self._species if x not in self._heldout]

    @property
    def heldout_species(self) -> list[Taxon]:
        return [x for x in self._species if x in self._heldout]

    def iter_examples(self, split: str) -> Iterator[tuple[str, Image.Image, Taxon]]:
        """(id, image, taxon) for images_per_species images of every species of split "seen" or "heldout"."""
        taxa = {"seen": self.seen_species, "heldout": self.heldout_species}.get(split)
        if taxa is None:
            raise InputError(f"split must be 'seen' or 'heldout', got {split!r}")
        for taxon in taxa:
            for index in range(self.config.images_per_species):
                yield f"synthetic/{taxon.genus}_{taxon.species}/{index:05d}", self.draw(taxon, index), taxon

    # ---- drawing --------------------------------------------------------------------------------------------------
    def _render(self, t: _Traits) -> Image.Image:
        """The organism in its canonical pose (head towards +x) on a transparent canvas of twice the image size."""
        g = _Geometry.of(t, 2 * self.config.image_size)
        body = _hsv(t.hue, 0.75, 0.85)
        accent = _hsv(t.hue, 0.5, 0.15) if t.accent_dark else _hsv(t.hue + 0.1, 0.15, 0.97)
        img = Image.new("RGBA", (g.r, g.r), (*body, 0))  # transparent body colour: no dark fringes when resampled
        _draw_appendages(ImageDraw.Draw(img), t, g, accent)
        inside = np.asarray(_body_mask(t, g)) > 0
        colour = self._body_colours(t, g, body, accent)
        arr = np.asarray(img).copy()
        arr[inside, :3], arr[inside, 3] = colour[inside], 255
        img = Image.fromarray(arr, "RGBA")
        draw = ImageDraw.Draw(img)
        head = _hsv(t.hue, 0.8, 0.5)
        draw.ellipse((g.hx - g.hr, g.cy - g.hr, g.hx + g.hr, g.cy + g.hr), fill=head + (255,))
        if t.marking == "eyed":
            for sy in (-1, 1):
                px, py, pr = g.cx - 0.3 * g.a, g.cy + sy * 0.45 * g.b, 0.2 * g.b + 2 * g.u
                draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=(250, 250, 240, 255))
                draw.ellipse((px - pr / 2, py - pr / 2, px + pr / 2, py + pr / 2), fill=(10, 10, 10, 255))
        return img

    def _body_colours(self, t: _Traits, g: "_Geometry", body: tuple, accent: tuple) -> np.ndarray:
        """The body's colour at every pixel: texture in body coordinates rotated by the genus angle, so it turns with
        the body in every pose, and the species' marking."""
        x, y = self._xx - (g.cx - g.r / 2), self._yy
        th = math.radians(t.angle)
        period = t.period * g.u
        pu, pv = (x * math.cos(th) + y * math.sin(th)) / period, (y * math.cos(th) - x * math.sin(th)) / period
        if t.texture == "striped":
            pattern = np.sin(2 * np.pi * pu) > 0.2
        elif t.texture == "spotted":
            pv = pv + 0.5 * np.round(pu)  # staggered rows
            pattern = (pu - np.round(pu)) ** 2 + (pv - np.round(pv)) ** 2 < 0.09
        elif t.texture == "ringed":
            pattern = np.sin(2 * np.pi * np.hypot(pu + 0.3 * g.a / period, pv)) > 0  # off-centre: the angle shows
        else:
            pattern = np.sin(np.pi * pu) * np.sin(np.pi * pv) > 0
        colour = np.where(pattern[..., None], np.array(accent, np.uint8), np.array(body, np.uint8))
        if t.marking == "bright-tipped":
            colour[x < -0.6 * g.a] = _hsv(t.hue + 0.5, 0.85, 0.95)
        elif t.marking == "collared":
            colour[(x > 0.45 * g.a) & (x < 0.68 * g.a)] = _hsv(t.hue + 0.5, 0.85, 0.95)
        return colour

    def _background(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Muted colours (saturation <= 0.35) so the background never imitates a kingdom's palette."""
        c1, c2 = (np.array(_hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.95)), np.float32) for _ in "12")
        kind = rng.integers(3)
        if kind == 0:
            mix = np.zeros((size, size), np.float32)
        elif kind == 1:
            d = rng.normal(size=2)
            mix = np.clip((self._gx * d[0] + self._gy * d[1]) / (np.abs(d).sum() + 1e-6) + 0.5, 0, 1)
        else:
            cells = rng.random((int(rng.integers(3, 9)),) * 2).astype(np.float32)
            mix = np.asarray(Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC)).clip(0, 1)
        return c1 * (1 - mix[..., None]) + c2 * mix[..., None]

    def draw(self, taxon: Taxon, index: int) -> Image.Image:
        """Image `index` of `taxon`: the same pixels for the same (seed, species, index), any index >= 0."""
        t = self._traits.get(taxon)
        if t is None:
            raise KeyError(f"{taxon} is not a species of this synthetic tree of life")
        if taxon not in self._cache:
            self._cache[taxon] = self._render(t)
        size = self.config.image_size
        rng = np.random.default_rng([self.config.seed, t.index, index])
        scaled = int(size * rng.uniform(0.85, 1.15))
        org = self._cache[taxon].rotate(rng.uniform(0, 360), Image.Resampling.BILINEAR)
        org = org.resize((scaled, scaled), Image.Resampling.BILINEAR)
        pos = (size - scaled) / 2 + rng.uniform(-0.1, 0.1, size=2) * size
        canvas = Image.fromarray(self._background(rng, size).astype(np.uint8), "RGB")
        canvas.paste(org, (int(round(pos[0])), int(round(pos[1]))), org)
        # lighting: overall gain, a colour tint and a soft directional gradient, then sensor noise
        img = np.asarray(canvas, np.float32)
        light = rng.normal(size=2) * 0.1
        grad = 1 + self._gx * light[0] + self._gy * light[1]
        img = img * rng.uniform(0.75, 1.2) * rng.uniform(0.95, 1.05, size=3) * grad[..., None]
        img += rng.normal(0, rng.uniform(2, 8), img.shape)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
