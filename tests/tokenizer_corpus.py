"""Deterministic text corpus for checking the tokenizer against open_clip, id for id.

BioCLIP-style taxonomic captions of every text type (made-up Latin-like names), plus the
inputs where a re-implementation tends to drift: non-Latin scripts, emoji sequences, HTML
entities, odd whitespace, contractions, digit/punctuation runs, literal special tokens,
mojibake that ftfy repairs, empty strings and texts far longer than the 77-token context.
"""

from __future__ import annotations

import random

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
RANK_SUFFIXES = ("", "ata", "es", "iformes", "idae", "", "")  # kingdom..species endings
SYLLABLES = (
    "pi ca hud so ni cor vus an ima li a chor da ta a ves pas ser i for mes ae cy no "
    "pha ne tri chi la rus mus cu lo pte ro myr me cia ur si dae fe lis ca nis quer cus "
    "rho do den dron oph rys zo nu ba thy lep ti tha la sso bo re al gra ci xen ops"
).split()
ADJECTIVES = (
    "black-billed", "red-winged", "common", "lesser", "greater", "spotted", "Steller's",
    "blue", "yellow-bellied", "three-toed", "rough-legged", "white-tailed", "Cooper's",
    "grey", "long-eared", "northern", "pygmy", "ruby-throated", "Ross's", "silver",
)
NOUNS = (
    "magpie", "jay", "warbler", "hawk", "oak", "fern", "orchid", "beetle", "moth", "shrew",
    "salamander", "toad", "lichen", "sedge", "snapper", "goby", "bat", "vole", "finch", "wren",
)
TEMPLATES = (
    "a photo of {}.", "a bad photo of a {}.", "a photo of the large {}.", "itap of a {}.",
    "a close-up photo of a {}.", "a drawing of the {}.", "a cropped photo of a {}.", "{}",
    "A PHOTO OF {}.", "a photo of {}",
)
FOREIGN = (
    "Eichelhäher", "Mésange bleue", "Ñandú común", "Grønlandsmåke", "Straße", "Pingüino",
    "Élan d'Amérique", "Søndre", "øresund", "Größe", "façade", "naïve", "Ærø", "İstanbul",
    "喜鹊", "カササギ", "까치", "北美喜鹊", "العقعق", "Сорока обыкновенная", "ЁЛКА", "नीलकंठ",
    "นกกางเขน", "Καρακάξα", "עורב", "ᏣᎳᎩ", "ꦧꦱꦗꦮ", "Ǆemal", "ǅ", "ﬁsh ﬂower", "\u0345x",
    "\U00010940\U00010941", "\U000323b0", "\U00011de0", "ᴀʙᴄ", "Ⅻ", "①②", "²³", "½",
)
EMOJI = (
    "🐦", "🦅", "🐍🦎", "👨\u200d👩\u200d👧\u200d👦", "👍🏽", "👋🏿", "🏳️\u200d🌈", "🇺🇸🇫🇷",
    "1️⃣", "❤️", "🧑🏻\u200d🔬", "☕", "🦋🐛", "✔", "©®™",
)
ENTITIES = ("&amp;", "&lt;", "&gt;", "&#39;", "&amp;amp;", "&quot;", "&nbsp;", "&#x27;",
            "&eacute;", "&amp;amp;amp;", "&lt;b&gt;", "&copy;", "&#8217;", "&notanentity;")
SPACES = ("\t", "\n", "\r\n", "\u00a0", "\u200b", "\u3000", "\u2028", "\x1c", "\x85",
          "\u180e", "\ufeff", "\u2009", "  ", "\x0b", "\x0c", "\x00", "\x1b[31m")
CONTRACTIONS = ("IT'S", "DON'T", "We'RE", "I'M", "she'LL", "He'D", "they've", "You'Ve",
                "'S", "''s", "it’s", "can't", "o'clock", "rock'n'roll", "'ll'll", "Y'ALL'D")
PUNCT = ("1234", "3.14", "(sp.)", "...!!!", "--", "n=42", "50%", "#1", "$3.50", "2021-06-01",
         "1st", "٣٤", "１２３", "?!?", "~~~", "@_@", "[*]", "a/b\\c", "x²", "—", "«»", "‰")
SPECIAL_LITERALS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>",
                    "<START_OF_TEXT>", "<\u017ftart_of_text>", "<end_of_text><start_of_text>")
MOJIBAKE_SOURCES = ("café", "señor", "über", "naïve", "it’s", "“quoted”", "Привет", "日本",
                    "Größe", "crème brûlée", "🐦")


def latin(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi)))


def taxon(rng: random.Random) -> list[str]:
    """Seven made-up ranks, kingdom..species (genus capitalised, species lowercase)."""
    names = [(latin(rng) + suffix).capitalize() for suffix in RANK_SUFFIXES[:6]]
    return names + [latin(rng)]


def common_name(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def caption(rng: random.Random) -> str:
    """One BioCLIP caption of a random text type, in a random template."""
    ranks, common = taxon(rng), common_name(rng)
    if rng.random() < 0.2:  # partial taxonomy, as for specimens not identified to species
        ranks = ranks[: rng.randint(1, 6)]
    sci = " ".join(ranks[-2:])
    tax = " ".join(ranks)
    tagged = " ".join(f"{r} {n}" for r, n in zip(RANKS, ranks))
    text = rng.choice((sci, common, tax, f"{sci} with common name {common}",
                       f"{tax} with common name {common}", tagged))
    return rng.choice(TEMPLATES).format(text)


def mojibake(rng: random.Random) -> str:
    src = rng.choice(MOJIBAKE_SOURCES).encode("utf-8")
    try:
        return src.decode(rng.choice(("cp1252", "latin-1")))
    except UnicodeDecodeError:  # cp1252 leaves a few bytes undefined
        return src.decode("latin-1")


def noise(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(FOREIGN)
    if kind == 1:
        return rng.choice(EMOJI)
    if kind == 2:
        return rng.choice(ENTITIES)
    if kind == 3:
        return rng.choice(SPACES)
    if kind == 4:
        return rng.choice(CONTRACTIONS)
    if kind == 5:
        return rng.choice(PUNCT)
    if kind == 6:
        return rng.choice(SPECIAL_LITERALS)
    if kind == 7:
        return mojibake(rng)
    # random code points from a few interesting blocks, combining marks included
    lo, hi = rng.choice(((0x300, 0x36F), (0x400, 0x4FF), (0x900, 0x97F), (0x3040, 0x30FF),
                         (0x1F300, 0x1F6FF), (0x2000, 0x206F), (0xE000, 0xE010)))
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))


def noisy(rng: random.Random) -> str:
    """A caption with noise spliced in at random places (with or without spaces around)."""
    words = caption(rng).split(" ")
    for _ in range(rng.randint(1, 4)):
        glue = rng.choice(("", " "))
        i = rng.randrange(len(words) + 1)
        words.insert(i, glue + noise(rng) + glue)
    return rng.choice((" ", "")).join(words) if rng.random() < 0.1 else " ".join(words)


FIXED = [
    "", " ", "\t\n ", "\u200b", "a photo of Pica hudsonia.", "a photo of black-billed magpie.",
    "a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia.",
    "a photo of Pica hudsonia with common name black-billed magpie.",
    "a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia with common name "
    "black-billed magpie.",
    "a photo of kingdom Animalia phylum Chordata class Aves order Passeriformes family Corvidae "
    "genus Pica species hudsonia.",
    "<start_of_text>", "<end_of_text>", "x<end_of_text>", "!<end_of_text>", "'<end_of_text>",
    "'s<end_of_text>", "7<start_of_text>8", "<end_of_text><end_of_text>", "!<end_of_text><end_of_text>",
    "a < b &amp; c", "&amp;amp;amp;", "<|endoftext|>", "a<|startoftext|>b", "'ſ", "\ud800 lone",
    "\U0001f426" * 100, "7" * 200, "ab" * 300, "é" * 80, "Ｆｕｌｌｗｉｄｔｈ",
]


def build_corpus(n: int = 5000, seed: int = 0) -> list[str]:
    """FIXED edge cases plus n generated strings; same output for the same (n, seed)."""
    rng = random.Random(seed)
    out = list(FIXED)
    for i in range(n):
        kind = i % 10
        if kind < 5:
            out.append(caption(rng))
        elif kind < 9:
            out.append(noisy(rng))
        else:  # far beyond 77 tokens
            out.append(" ".join(noisy(rng) if rng.random() < 0.5 else caption(rng)
                                for _ in range(rng.randint(4, 12))))
    return out
