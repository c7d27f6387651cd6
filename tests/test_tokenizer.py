"""bioclip_jax.tokenizer must give exactly open_clip.tokenize's ids (open_clip is the oracle)."""

import importlib.resources
import os
import sys

import numpy as np
import open_clip
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # whether or not tests/ is a package
from tokenizer_corpus import build_corpus  # noqa: E402

from bioclip_jax.tokenizer import Tokenizer, get_tokenizer, tokenize  # noqa: E402

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def reference(corpus):
    return open_clip.tokenize(corpus).numpy()


def assert_same_ids(texts, ours, ref):
    assert ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=1))
    report = [f"{texts[i]!r}\n  ours: {ours[i].tolist()}\n  open_clip: {ref[i].tolist()}" for i in bad[:5]]
    assert not len(bad), f"{len(bad)} of {len(texts)} texts differ, first ones:\n" + "\n".join(report)


def test_corpus_is_deterministic_and_large(corpus, reference):
    assert corpus == build_corpus()
    assert len(corpus) >= 5000
    assert (reference[:, -1] != 0).sum() > 100  # many texts overflow the 77-token context


def test_ids_match_open_clip_on_corpus(corpus, reference):
    ours = tokenize(corpus)
    assert ours.dtype == np.int32
    assert_same_ids(corpus, ours, reference)


@pytest.mark.parametrize("context_length", [2, 3, 16, 100])
def test_other_context_lengths_match_open_clip(corpus, context_length):
    texts = corpus[:300] + corpus[-300:]
    ref = open_clip.tokenize(texts, context_length=context_length).numpy()
    assert_same_ids(texts, tokenize(texts, context_length=context_length), ref)


def test_encode_and_decode_match_open_clip(corpus):
    ref_tok = open_clip.tokenizer._tokenizer
    tok = get_tokenizer()
    texts = corpus[::20]
    assert tok.encode_batch(texts) == [ref_tok.encode(t) for t in texts]
    for t in texts[:100]:
        ids = tok.encode(t)
        assert ids == ref_tok.encode(t)
        assert tok.decode(ids) == ref_tok.decode(ids)
    assert tok.decode(tok.encode("A photo of Pica hudsonia.")) == "a photo of pica hudsonia . "


def test_shapes_dtype_and_specials():
    tok = get_tokenizer()
    assert get_tokenizer() is tok and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, SOT, EOT)
    one = tokenize("a photo of Pica hudsonia.")
    assert one.shape == (1, 77) and one.dtype == np.int32
    assert tokenize(("a", "b", "c")).shape == (3, 77)
    assert tokenize([]).shape == (0, 77) and tokenize([]).dtype == np.int32
    assert tokenize("")[0, :3].tolist() == [SOT, EOT, 0]
    assert tok("a photo", context_length=5).shape == (1, 5)


def test_truncation_keeps_sot_first_75_and_eot():
    text = " ".join(f"Pica hudsonia {i}" for i in range(40))
    ids = get_tokenizer().encode(text)
    assert len(ids) > 75
    row = tokenize(text)[0]
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1].tolist() == ids[:75]
    exact = tokenize(" ".join(["magpie"] * 75))[0]  # exactly fits: no truncation, no padding
    assert exact[-1] == EOT and (exact[1:-1] != 0).all()


def test_literal_special_tokens_follow_open_clip():
    # open_clip honours a literal special only where its regex may start a match.
    for text in ["x<end_of_text>", "a <start_of_text> b", "!<end_of_text>", "'<end_of_text>",
                 "<end_of_text><start_of_text>", "!<end_of_text><end_of_text>", "<|endoftext|>"]:
        assert_same_ids([text], tokenize(text), open_clip.tokenize(text).numpy())
    assert EOT in get_tokenizer().encode("x<end_of_text>")
    assert EOT not in get_tokenizer().encode("!<end_of_text>")


def test_errors():
    with pytest.raises(TypeError, match=r"texts\[1\].*int"):
        tokenize(["a photo", 3])
    with pytest.raises(TypeError, match=r"texts\[0\].*bytes"):
        tokenize([b"a photo"])
    for bad in (None, 5, b"a photo"):
        with pytest.raises(TypeError):
            tokenize(bad)
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="context_length"):
            tokenize("a photo", context_length=bad)
    with pytest.raises(TypeError, match="context_length"):
        tokenize("a photo", context_length=7.5)
    with pytest.raises(TypeError):
        get_tokenizer().encode(["a photo"])


def test_vocab_ships_as_package_data():
    assets = importlib.resources.files("bioclip_jax") / "assets"
    assert (assets / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert "OpenAI" in (assets / "LICENSE_CLIP_BPE.txt").read_text()
