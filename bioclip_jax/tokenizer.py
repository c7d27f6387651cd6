"""CLIP BPE tokenizer, id-for-id identical to ``open_clip.tokenize`` (``clean='lower'``).

Text cleaning runs in Python (ftfy + html, exactly as open_clip); pre-tokenisation and
BPE run in the Rust ``tokenizers`` library, batched. The vocabulary ships as package data.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex  # open_clip's regex engine; used only to derive its exact character classes
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer

from bioclip_jax.errors import InputError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)
SPECIALS = ("<start_of_text>", "<end_of_text>")  # open_clip's names; ids 49406, 49407
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
MARKERS = ("\n", "\t", "\r")  # text end, SOT, EOT inside the Rust pipeline (see Tokenizer)
CHUNK = 256  # texts per Rust call


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map of the 256 byte values onto printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, html-unescape twice, collapse whitespace, lowercase."""
    # Fast path: ftfy and html.unescape leave printable ASCII without '&' unchanged (no
    # mojibake, entities, controls, quotes or line breaks to fix), and ftfy is the slow part.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() (not a \s regex) as in open_clip: it also splits on U+001C..U+001F.
    return " ".join(text.split()).lower()


def _split_pattern() -> str:
    r"""open_clip's regex for Oniguruma (the Rust side), with classes taken from `regex` itself.

    open_clip runs ``<specials>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`` with
    IGNORECASE in the `regex` module. Oniguruma's own \p{L}/\p{N} lag in Unicode version (no
    Unicode 16/17 letters or digits) and differ under IGNORECASE (`regex` puts U+0345 in none of
    the classes, so findall drops it; 's also matches 'ſ), so the classes and the case variants
    of the literals are computed from `regex` and written out as code point ranges (once per process).
    """
    every = np.r_[0:0xD800, 0xE000:0x110000].astype("<u4").tobytes().decode("utf-32-le")
    cp = lambda i: i + 0x800 * (i >= 0xD800)  # string index -> code point (surrogates skipped)

    def cls(body: str) -> str:
        spans = ((cp(m.start()), cp(m.end() - 1)) for m in regex.finditer(f"[{body}]+", every, regex.I))
        return "[" + "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in spans) + "]"

    letters = set("".join(SPECIALS + CONTRACTIONS)) - set("<>_")
    variants = regex.findall(f"[{''.join(letters)}]", every, regex.I)
    folds = {c: "".join(v for v in variants if regex.fullmatch(c, v, regex.I)) for c in letters}
    # The literals' other characters (< > _ ') are no regex syntax, so they stay as they are.
    lit = lambda word: "".join(f"[{folds[c]}]" if c in folds else c for c in word)
    alts = [lit(s) for s in SPECIALS] + [lit("'" + c) for c in CONTRACTIONS]
    return "|".join(alts + [cls(r"\p{L}") + "+", cls(r"\p{N}"), cls(r"^\s\p{L}\p{N}") + "+"])


class Tokenizer:
    """CLIP BPE tokenizer (vocab 49408, SOT 49406, EOT 49407, pad 0)."""

    def __init__(self) -> None:
        path = importlib.resources.files(__package__ or "bioclip_jax") / "assets" / VOCAB_FILE
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        chars = list(self._byte_encoder.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIALS)
        self._id_to_token = tokens
        self.vocab_size = len(tokens)
        self.sot_token_id, self.eot_token_id = self.vocab_size - 2, self.vocab_size - 1

        # Split keeps only the regex matches (like findall); ByteLevel then maps UTF-8 bytes to
        # the byte-unicode alphabet, as open_clip does before its BPE.
        self._split = pre_tokenizers.Split(Regex(_split_pattern()), behavior="removed", invert=True)
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, end_of_word_suffix="</w>")
        self._rust = _RustTokenizer(bpe)
        self._rust.pre_tokenizer = pre_tokenizers.Sequence(
            [self._split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        # Cleaned text has no whitespace but ' ', so \n \t \r are free to be Rust "added tokens"
        # (cut out before pre-tokenisation): \n ends each text, so a chunk of texts is one Rust
        # string (per-string overhead dominates short captions); \t and \r stand for the literal
        # specials open_clip honours. The literals can't be added tokens themselves: those match
        # anywhere, open_clip only where its regex may start a match (not in "!<end_of_text>").
        self._rust.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
        self._sep_id, sot, eot = (self._rust.token_to_id(m) for m in MARKERS)
        self._to_vocab = np.arange(self._rust.get_vocab_size(with_added_tokens=True), dtype=np.int32)
        self._to_vocab[[sot, eot]] = self.sot_token_id, self.eot_token_id  # Rust id -> CLIP id
        self._marker = dict(zip(SPECIALS, MARKERS[1:]))

    def _mark_specials(self, text: str) -> str:
        """Replace the literal specials that open_clip's regex honours in cleaned text by markers."""
        if "<" not in text:
            return text
        # A case variant the regex matches as a special (say with U+017F for 's') is no exact
        # vocab key for open_clip either: it stays, and is BPE'd as one word, as there.
        cuts = [(a, b, self._marker[p]) for p, (a, b) in self._split.pre_tokenize_str(text) if p in self._marker]
        for a, b, m in reversed(cuts):
            text = text[:a] + m + text[b:]
        return text

    def _encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All ids back to back, and the start and end of each text's ids in them."""
        cleaned = [self._mark_specials(clean(t)) + MARKERS[0] for t in texts]
        chunks = ["".join(cleaned[i : i + CHUNK]) for i in range(0, len(cleaned), CHUNK)]
        # Parallel over chunks; encode_batch_fast (tokenizers >= 0.20) skips offset bookkeeping.
        encode = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)
        encs = encode(chunks, add_special_tokens=False)
        flat = np.concatenate([np.array(e.ids, dtype=np.int32) for e in encs] or [np.zeros(0, np.int32)])
        ends = np.flatnonzero(flat == self._sep_id)
        starts = np.zeros_like(ends)
        starts[1:] = ends[:-1] + 1
        return self._to_vocab[flat], starts, ends

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without SOT/EOT."""
        flat, starts, ends = self._encode_flat(_check_texts(texts))
        return [flat[a:b].tolist() for a, b in zip(starts, ends)]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of encode up to cleaning; word ends ('</w>') become spaces, as in open_clip."""
        text = "".join(self._id_to_token[int(i)] for i in ids)
        raw = bytes(self._byte_decoder[c] for c in text)  # specials are plain ASCII too
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        """int32 [N, context_length]: SOT, ids, EOT, zero padding; too long keeps SOT + first
        context_length - 2 ids + EOT (open_clip truncates, then overwrites the last with EOT)."""
        texts = _check_texts(texts)
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise InputError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        flat, starts, ends = self._encode_flat(texts)
        n = np.minimum(ends - starts, context_length - 2)  # ids kept per row
        col = np.arange(context_length - 2)
        keep = col < n[:, None]
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        out[:, 0] = self.sot_token_id
        out[:, 1:-1][keep] = flat[(starts[:, None] + col)[keep]]
        out[np.arange(len(texts)), n + 1] = self.eot_token_id
        return out


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return texts


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer, built once per process (loading the merges and compiling the regex cost a moment:
    docs/performance.md)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Tokenize like ``open_clip.tokenize``; returns int32 [N, context_length]."""
    return get_tokenizer()(texts, context_length)
