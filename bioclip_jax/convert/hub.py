"""Hugging Face hub names as weights sources, resolved to local files through huggingface_hub's cache.

    hf-hub:ORG/NAME    a model repository (open_clip layout, or a transformers CLIP folder)
    bioclip            = hf-hub:imageomics/bioclip     (BioCLIP, ViT-B/16)
    bioclip-2          = hf-hub:imageomics/bioclip-2   (BioCLIP 2, ViT-L/14)

An existing local path of the same name always wins. Online, files are downloaded into the cache (or found there);
offline (HF_HUB_OFFLINE=1) or when the hub cannot be reached, only the cache is read. Nothing else is fetched: the
config, one weights file (safetensors preferred, as open_clip does) and, for transformers folders, the preprocessor.

The TreeOfLife species embeddings pybioclip uses for the two BioCLIP releases live in the training data's dataset
repository, not the model's (pybioclip `_constants.TOL_MODELS`, `predict.py get_txt_emb`): `resolve_txt_emb` fetches
them the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from bioclip_jax.convert import transformers as hf
from bioclip_jax.convert.files import OPEN_CLIP_BIN, OPEN_CLIP_CONFIG, OPEN_CLIP_SAFETENSORS
from bioclip_jax.errors import InputError, first_line

OPEN_CLIP_WEIGHTS = (OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN)  # open_clip's order of preference
TRANSFORMERS_CONFIG = hf.CONFIG
TRANSFORMERS_WEIGHTS = hf.WEIGHTS
TRANSFORMERS_OPTIONAL = (hf.PREPROCESSOR_CONFIG, hf.PROCESSOR_CONFIG)

HUB_PREFIX = "hf-hub:"
ALIASES = {"bioclip": "imageomics/bioclip", "bioclip-2": "imageomics/bioclip-2"}
# Model repository -> dataset repository holding its species embeddings (pybioclip's TOL_MODELS).
TXT_EMB_REPOS = {"imageomics/bioclip": "imageomics/TreeOfLife-10M",
                 "imageomics/bioclip-2": "imageomics/TreeOfLife-200M"}
TXT_EMB_FILES = ("embeddings/txt_emb_species.npy", "embeddings/txt_emb_species.json")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def hub_repo_id(source: str | os.PathLike) -> str | None:
    """The hub repository a weights source names, or None when it is a local path (an existing path wins)."""
    text = os.fspath(source)
    if os.path.exists(text):
        return None
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        if not _REPO_ID.fullmatch(repo_id):
            raise InputError(f"{text}: expected hf-hub:ORG/NAME, e.g. hf-hub:imageomics/bioclip")
        return repo_id
    return ALIASES.get(text)


def cache_dir() -> Path:
    """huggingface_hub's cache folder as the environment says now (its constants are read once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[name])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in _TRUE


def download_model(repo_id: str) -> Path:
    """The local snapshot folder of a model repository with its config and one weights file."""
    hub = _Fetcher(repo_id, "model")
    config = hub.get(OPEN_CLIP_CONFIG)
    if config is not None:
        hub.first_of(OPEN_CLIP_WEIGHTS, revision=_commit(config, OPEN_CLIP_CONFIG))
        return config.parent
    config = hub.get(TRANSFORMERS_CONFIG)
    if config is None:
        raise hub.missing(f"{OPEN_CLIP_CONFIG} (open_clip) or {TRANSFORMERS_CONFIG} (transformers CLIP)")
    revision = _commit(config, TRANSFORMERS_CONFIG)
    hub.first_of(TRANSFORMERS_WEIGHTS, revision=revision)
    for name in TRANSFORMERS_OPTIONAL:
        hub.get(name, revision=revision)
    return config.parent


def resolve_txt_emb(source: str | os.PathLike) -> Path:
    """The folder holding txt_emb_species.npy/.json for a BioCLIP release named by `source` (as pybioclip fetches
    them), so tree-of-life prediction needs no --txt-emb for those models."""
    repo_id = hub_repo_id(source)
    if repo_id not in TXT_EMB_REPOS:
        known = ", ".join(f"{HUB_PREFIX}{r}" for r in TXT_EMB_REPOS)
        raise InputError(f"{source}: no published TreeOfLife species embeddings for this model (only for {known} "
                         "and their aliases); pass --txt-emb DIR (make-txt-emb writes one)")
    hub = _Fetcher(TXT_EMB_REPOS[repo_id], "dataset")
    matrix = hub.get(TXT_EMB_FILES[0])
    if matrix is None:
        raise hub.missing(TXT_EMB_FILES[0])
    names = hub.get(TXT_EMB_FILES[1], revision=_commit(matrix, TXT_EMB_FILES[0]))
    if names is None:
        raise hub.missing(TXT_EMB_FILES[1])
    return matrix.parent


def download_dataset_file(repo_id: str, filename: str) -> Path:
    """One file of a dataset repository (pybioclip's `get_cached_datafile`), from the hub or the local cache."""
    hub = _Fetcher(repo_id, "dataset")
    path = hub.get(filename)
    if path is None:
        raise hub.missing(filename)
    return path


def _commit(path: Path, filename: str) -> str:
    """The snapshot (commit) a cached file belongs to: later files come from the same one."""
    return path.parents[len(filename.split("/")) - 1].name


@contextlib.contextmanager
def _offline_constants():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; a cache-only read must not reach for the network (it
    fetches e.g. its user-agent registry unless its constant says offline), whenever the variable was set."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


class _Fetcher:
    """Files of one repository: from the hub when online (the cache when it answers so), else from the cache."""

    def __init__(self, repo_id: str, repo_type: str):
        self.repo_id, self.repo_type = repo_id, repo_type
        self.cache = cache_dir()
        self.unreachable = "offline (HF_HUB_OFFLINE is set)" if offline() else ""

    @property
    def name(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" if self.repo_type == "model" else f"dataset {self.repo_id}"

    def get(self, filename: str, revision: str | None = None) -> Path | None:
        """The local path of a file, or None when the repository lacks it (online) or the cache does (offline)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        kwargs = dict(repo_id=self.repo_id, filename=filename, repo_type=self.repo_type, revision=revision,
                      cache_dir=str(self.cache))
        if not self.unreachable:
            try:
                return Path(hf_hub_download(**kwargs))
            except RemoteEntryNotFoundError:
                return None
            except RepositoryNotFoundError:  # also gated and private repositories (GatedRepoError)
                raise FileNotFoundError(f"{self.name}: no such repository on the Hugging Face hub, or it is private "
                                        "or gated (log in with `hf auth login` if you have access)") from None
            except RevisionNotFoundError:
                raise FileNotFoundError(f"{self.name}: revision {revision or 'main'} not found on the hub") from None
            except LocalEntryNotFoundError as e:  # the hub did not answer and the cache lacks the file
                self.unreachable = f"the hub could not be reached ({first_line(e)})"
                return None
            except (ConnectionError, OSError) as e:  # network errors (httpx and HfHubHTTPError are OSErrors too)
                self.unreachable = f"the hub could not be reached ({first_line(e)})"
        try:
            with _offline_constants():
                return Path(hf_hub_download(**kwargs, local_files_only=True))
        except EntryNotFoundError:  # LocalEntryNotFoundError, or a cached "no such file" marker
            return None

    def first_of(self, filenames: tuple[str, ...], revision: str) -> Path:
        for filename in filenames:
            path = self.get(filename, revision=revision)
            if path is not None:
                return path
        raise self.missing(" or ".join(filenames))

    def missing(self, what: str) -> FileNotFoundError:
        if self.unreachable:
            return FileNotFoundError(f"{self.name}: {what} is not in the local Hugging Face cache ({self.cache}) and "
                                     f"{self.unreachable}; connect once to download it, or set HF_HUB_CACHE to a "
                                     "cache that has it")
        return FileNotFoundError(f"{self.name}: the repository has no {what}")

