"""Hub names (hf-hub:ORG/NAME, bioclip, bioclip-2) resolve through a local cache laid out as huggingface_hub writes it;
nothing here reaches the network (sockets refuse to connect)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import bioclip_jax
from bioclip_jax import cli
from bioclip_jax.convert import hub
from bioclip_jax.convert.checkpoint import export_transformers
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.inference.tree_of_life import load_txt_emb, save_txt_emb

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], repo_type: str = "model",
                 commit: str = COMMIT) -> Path:
    """Puts files into a huggingface_hub cache: blobs named by content hash, snapshot entries as relative symlinks to
    them, refs/main naming the commit. Returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection fails (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network):
    """An offline hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1) and a working folder without local look-alikes."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(model, open_clip folder with safetensors and .bin)."""
    model = bioclip_jax.create_model("tiny", seed=5)
    folder = bioclip_jax.export_open_clip(model, tmp_path_factory.mktemp("export") / "oc", write_bin=True)
    return model, folder


def _open_clip_files(folder: Path, weights=("open_clip_model.safetensors",)) -> dict[str, Path]:
    return {name: folder / name for name in ("open_clip_config.json", *weights)}


def _same_params(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_hub_names_load_offline_from_the_cache(hub_cache, tiny_export, no_network):
    model, folder = tiny_export
    add_to_cache(hub_cache, "imageomics/bioclip", _open_clip_files(folder))
    for name in ("hf-hub:imageomics/bioclip", "bioclip"):
        loaded = bioclip_jax.load(name)
        assert loaded.source == "hf-hub:imageomics/bioclip"
        assert _same_params(loaded, model) and loaded.config.to_open_clip() == model.config.to_open_clip()
    assert no_network == []


def test_hf_home_locates_the_cache(tmp_path, monkeypatch, tiny_export, no_network):
    model, folder = tiny_export
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(tmp_path / "home" / "hub", "imageomics/bioclip-2", _open_clip_files(folder))
    assert _same_params(bioclip_jax.load("hf-hub:imageomics/bioclip-2"), model)
    assert no_network == []


class _NoSleep:
    """The time module without waiting: huggingface_hub retries failed connections with backoff (about 25 s)."""

    sleep = staticmethod(lambda seconds: None)

    def __getattr__(self, name):
        return getattr(time, name)


def test_an_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch, tiny_export, no_network):
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    model, folder = tiny_export
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (an earlier test may have imported it offline).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils._http, "time", _NoSleep())
    add_to_cache(hub_cache, "imageomics/bioclip", _open_clip_files(folder))
    assert _same_params(bioclip_jax.load("bioclip"), model)
    assert no_network, "online mode should have tried the hub first"
    with pytest.raises(FileNotFoundError) as info:
        bioclip_jax.load("hf-hub:imageomics/elsewhere")
    message = str(info.value)
    assert "\n" not in message and "hf-hub:imageomics/elsewhere" in message
    assert "open_clip_config.json" in message and "could not be reached" in message


def test_torch_weights_when_the_cache_has_no_safetensors(hub_cache, tiny_export):
    model, folder = tiny_export
    add_to_cache(hub_cache, "imageomics/bioclip", _open_clip_files(folder, ("open_clip_pytorch_model.bin",)))
    assert _same_params(bioclip_jax.load("bioclip"), model)


def test_a_local_path_wins_over_the_alias(hub_cache, tiny_export):
    model, folder = tiny_export
    add_to_cache(hub_cache, "imageomics/bioclip", _open_clip_files(folder))
    other = bioclip_jax.create_model("tiny", seed=6)
    bioclip_jax.export_open_clip(other, "bioclip", write_bin=False)  # ./bioclip in the working folder
    loaded = bioclip_jax.load("bioclip")
    assert loaded.source == "bioclip" and _same_params(loaded, other)


def test_missing_repositories_and_files_are_one_line_errors(hub_cache, tiny_export, capsys, no_network):
    _, folder = tiny_export
    with pytest.raises(FileNotFoundError) as info:
        bioclip_jax.load("hf-hub:imageomics/nothing")
    message = str(info.value)
    assert "\n" not in message and message.startswith("hf-hub:imageomics/nothing: ")
    assert "open_clip_config.json" in message and str(hub_cache) in message and "HF_HUB_OFFLINE" in message

    add_to_cache(hub_cache, "imageomics/bioclip", {"open_clip_config.json": folder / "open_clip_config.json"})
    with pytest.raises(FileNotFoundError, match="hf-hub:imageomics/bioclip: open_clip_model.safetensors or "
                                                "open_clip_pytorch_model.bin is not in the local Hugging Face cache"):
        bioclip_jax.load("bioclip")

    with pytest.raises(ValueError, match="expected hf-hub:ORG/NAME"):
        bioclip_jax.load("hf-hub:no-slash")

    image = Path("a.png")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert cli.main(["embed", str(image), "--model", "hf-hub:imageomics/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hf-hub:imageomics/nothing" in err
    assert no_network == []


def test_transformers_repositories_load_from_the_cache(hub_cache, tmp_path):
    model = bioclip_jax.create_model("tiny", seed=7)
    export = export_transformers(model, tmp_path / "hf")
    add_to_cache(hub_cache, "someone/tiny-clip", {name: export / name for name in
                                                  ("config.json", "model.safetensors", "preprocessor_config.json")})
    loaded = bioclip_jax.load("hf-hub:someone/tiny-clip")
    assert _same_params(loaded, model) and loaded.preprocess == model.preprocess


def _species_embeddings(folder: Path, dim: int = 64) -> list[Taxon]:
    taxa = [Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", genus, epithet], common)
            for genus, epithet, common in (("Pica", "hudsonia", "black-billed magpie"), ("Pica", "pica", "magpie"),
                                           ("Corvus", "corax", "raven"))]
    vectors = np.random.default_rng(0).normal(size=(len(taxa), dim)).astype(np.float32)
    save_txt_emb(folder, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), taxa)
    return taxa


def test_species_embeddings_come_from_the_release_dataset(hub_cache, tmp_path, tiny_export, capsys, no_network):
    model, folder = tiny_export
    taxa = _species_embeddings(tmp_path / "emb")
    add_to_cache(hub_cache, "imageomics/TreeOfLife-10M",
                 {f"embeddings/{name}": tmp_path / "emb" / name
                  for name in ("txt_emb_species.npy", "txt_emb_species.json")}, repo_type="dataset")
    resolved = hub.resolve_txt_emb("bioclip")
    assert resolved == hub.resolve_txt_emb("hf-hub:imageomics/bioclip")
    assert [t.ranks for t in load_txt_emb(resolved)[1]] == [t.ranks for t in taxa]

    with pytest.raises(ValueError, match="pass --txt-emb DIR"):
        hub.resolve_txt_emb("hf-hub:someone/else")
    with pytest.raises(ValueError, match="pass --txt-emb DIR"):
        hub.resolve_txt_emb(folder)
    with pytest.raises(FileNotFoundError, match="dataset imageomics/TreeOfLife-200M: "
                                                "embeddings/txt_emb_species.npy is not in the local"):
        hub.resolve_txt_emb("bioclip-2")

    # The CLI: tree-of-life prediction with a BioCLIP hub model needs no --txt-emb.
    add_to_cache(hub_cache, "imageomics/bioclip", _open_clip_files(folder))
    from PIL import Image

    Image.new("RGB", (80, 40), (200, 30, 30)).save("bird.png")
    assert cli.main(["predict", "bird.png", "--model", "bioclip", "--rank", "species", "--k", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("file_name,kingdom") and len(rows) == 3
    assert no_network == []
