"""Every file the package writes or reads back goes through `etils.epath`, the path layer Orbax and Grain use, so a
`gs://bucket/run` works wherever a local folder does."""

from __future__ import annotations

import os

from etils import epath

from bioclip_jax.errors import InputError


GCS_HINT = "pip install 'bioclip_jax[gcs]' for gs:// paths"


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path`: URLs as given, local paths made absolute (Orbax resolves relative paths differently in
    places; `os.path.abspath` must never see a URL, which it would turn into a local `gs:` folder)."""
    path = os.fspath(path)
    return epath.Path(path if is_url(path) else os.path.abspath(path))


def write_atomic(path: epath.Path, data: bytes) -> None:
    """Write to a temporary name, then rename: an interrupted export never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def make_dirs(path: epath.Path) -> None:
    """mkdir -p, with an error that names the URL and what is missing when a remote file system cannot be used
    (a package such as gcsfs, credentials, the network) instead of the file system's own."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except ImportError as e:  # epath's remote backends are optional packages
        raise InputError(f"{path}: {e} ({GCS_HINT})") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - remote backends raise their own types for credentials and network
        if not is_url(path):
            raise
        raise InputError(f"{path}: cannot create the run directory ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); check the credentials (e.g. gcloud auth "
                         "application-default login) and the network") from None
