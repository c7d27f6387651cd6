"""ruff (pyflakes, pycodestyle with its blank-line rules, import order, lines <= 120; pyproject.toml's [tool.ruff])
finds nothing in the package, the tools or the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extras: pip install -e '.[test]')")
    done = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "bioclip_jax", "tools", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
