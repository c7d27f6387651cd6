"""Every file the package writes or reads back goes through `etils.epath`, the path layer Orbax and Grain use, so a
`gs://bucket/run` works wherever a local folder does."""

from __future__ import annotations

import importlib.util
import logging
import os

from etils import epath

from bioclip_jax.errors import InputError, UnreachableError, first_line

GCS_HINT = "pip install 'bioclip_jax[gcs]' for gs:// paths"
GCS_ENDPOINT = "https://storage.googleapis.com"
# One try, no retries: gcsfs alone retries a missing bucket or a dead network for a minute and more before it fails.
PROBE_TIMEOUT_S = 5
LOGIN_HINT = "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json"
_reachable: set[tuple[str, str]] = set()  # (endpoint, bucket) probed in this process


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path`: URLs as given, local paths made absolute (Orbax resolves relative paths differently in
    places; `os.path.abspath` must never see a URL, which it would turn into a local `gs:` folder)."""
    path = os.fspath(path)
    if is_url(path):
        check_reachable(path)
        return epath.Path(path)
    return epath.Path(os.path.abspath(path))


def check_reachable(url: str | os.PathLike) -> None:
    """Fails in seconds, with one line naming `url` and the cause, when a gs:// bucket cannot be used: gcsfs missing
    or no credentials (InputError), no such bucket or access denied (InputError), the network down
    (UnreachableError). One request per bucket and process; other URL schemes are left to their file system."""
    url = os.fspath(url)
    if not url.startswith("gs://"):
        return
    bucket = url[len("gs://"):].split("/", 1)[0]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").rstrip("/")  # gcsfs's own switch to a local server
    endpoint = (emulator if "://" in emulator else f"http://{emulator}") if emulator else GCS_ENDPOINT
    if (endpoint, bucket) in _reachable:
        return
    if importlib.util.find_spec("gcsfs") is None:  # epath reads gs:// through it (found, not imported: seconds)
        raise InputError(f"{url}: gcsfs is not installed ({GCS_HINT})")
    import requests  # both come with gcsfs
    from google.auth import exceptions

    try:
        session = requests.Session() if emulator else _authorized_session()
        response = session.get(f"{endpoint}/storage/v1/b/{bucket}/o", params={"maxResults": 1, "fields": "kind"},
                               timeout=PROBE_TIMEOUT_S)
    except exceptions.DefaultCredentialsError:
        raise InputError(f"{url}: no Google Cloud credentials found ({LOGIN_HINT})") from None
    except exceptions.RefreshError as e:
        raise InputError(f"{url}: the Google Cloud credentials were refused ({first_line(e)}); {LOGIN_HINT}") from None
    except (requests.RequestException, exceptions.TransportError) as e:
        raise UnreachableError(f"{url}: cannot reach {endpoint} ({first_line(e)}); check the network") from None
    if response.status_code == 404:
        raise InputError(f"{url}: no such bucket gs://{bucket}")
    if response.status_code in (401, 403):
        raise InputError(f"{url}: access to gs://{bucket} denied for these credentials (HTTP {response.status_code}); "
                         f"check the bucket's permissions or log in as another account ({LOGIN_HINT})")
    if response.status_code >= 500:
        raise UnreachableError(f"{url}: {endpoint} answered HTTP {response.status_code}; try again later")
    _reachable.add((endpoint, bucket))


def _authorized_session():
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    # Its warning about each place it looked would come before our own line, which says the same.
    logger = logging.getLogger("google.auth._default")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
    finally:
        logger.setLevel(level)
    return AuthorizedSession(credentials)


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
    except FileExistsError:  # exist_ok covers folders only
        raise InputError(f"{path}: a file is in the way; expected a folder (or a path that does not exist)") from None
    except ImportError as e:  # epath's remote backends are optional packages
        raise InputError(f"{path}: {e} ({GCS_HINT})") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - remote backends raise their own types for credentials and network
        if not is_url(path):
            raise
        raise InputError(f"{path}: cannot create the run directory ({first_line(e)}); check the "
                         f"credentials ({LOGIN_HINT}) and the network") from None
