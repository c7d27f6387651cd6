"""Every file the package writes or reads back goes through `etils.epath`, the path layer Orbax and Grain use, so a
`gs://bucket/run` works wherever a local folder does."""

from __future__ import annotations

import os

from etils import epath


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
