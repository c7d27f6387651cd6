"""A non-editable install works outside the repository: the recipes ship inside the package, so `bioclip-jax demo`
and `bioclip-jax train --config demo` run from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # pip-installs the checkout, runs the CLI in subprocesses

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """This checkout built and installed non-editably (`pip install --target`), first on PYTHONPATH. Its
    dependencies come from the test environment, so nothing is downloaded; the package is the installed copy."""
    root = tmp_path_factory.mktemp("install")
    python = sys.executable
    build = root / "build"  # a copy of the files git knows of: nothing ignored (caches, runs) may be needed
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = REPO / name.decode(), build / name.decode()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            dst.write_bytes(src.read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(root / "site"), str(build)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    return python, root / "site", env


def _run(python, args, cwd, env):
    return subprocess.run([str(python), "-m", "bioclip_jax", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_demo_and_train_by_recipe_name_from_an_empty_directory(installed, tmp_path):
    python, site, env = installed
    where = subprocess.run([str(python), "-c", "import bioclip_jax; print(bioclip_jax.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run(python, ["demo", "--workdir", "run", "--config.model=tiny", "--config.train.steps=2",
                         "--config.train.global_batch_size=16", "--config.checkpoint.every_steps=2"], empty, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 2 steps" in done.stdout and (empty / "run" / "open_clip" / "open_clip_config.json").exists()
    done = _run(python, ["train", "--config", "demo", "--workdir", "again", "--config.model=tiny",
                         "--config.train.steps=1", "--config.train.global_batch_size=16",
                         "--config.data.train=run/data/train", "--config.data.val="], empty, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1: loss" in done.stdout
    done = _run(python, ["train", "--config", "no_such_recipe", "--workdir", "x"], empty, env)
    recipes = "bioclip2_vitl14, bioclip_vitb16, demo, finetune"
    assert done.returncode == 2 and f"not a recipe name (recipes: {recipes})" in done.stderr
