"""No run is silently lost: one trainer per workdir, a command checked against the run it would continue before
anything is written, damaged checkpoints kept aside and repaired, metrics with each step once, a full disk named."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from test_train import CONFIG, _config, shards  # noqa: F401 - the shards fixture

import bioclip_jax
from bioclip_jax import paths
from bioclip_jax.cli import main
from bioclip_jax.convert import run_dir
from bioclip_jax.errors import InputError, ResourceError
from bioclip_jax.train.trainer import train
from bioclip_jax.train.workdir import WorkdirLock

pytestmark = pytest.mark.integration  # every test trains or resumes a tiny run end to end

ROOT = Path(__file__).parent.parent


def _flat(workdir):
    return traverse_util.flatten_dict(bioclip_jax.load(workdir).params, sep="/")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):  # noqa: F811
    """A finished 4-step run (checkpoints at 2 and 4) and its params."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(_config(shards, "train.steps=4"), workdir, progress=False)
    return workdir, _flat(workdir), (workdir / "bioclip_jax_run.json").read_text()


def test_a_second_trainer_on_the_same_workdir_is_refused_naming_the_holder(shards, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    workdir.mkdir()
    with WorkdirLock(paths.resolve(workdir)):
        with pytest.raises(InputError, match=r"is in use by another training process \(host .*, pid \d+, since"):
            train(_config(shards), workdir, progress=False)
    train(_config(shards, "train.steps=1"), workdir, progress=False)  # released: the next command runs


def test_a_failing_command_leaves_the_finished_run_loadable(finished, tmp_path):
    workdir, params, run_text = finished
    with pytest.raises(FileNotFoundError, match="no .array_record shards found"):
        train(_config(tmp_path / "typo", "train.steps=8"), workdir, progress=False)
    assert (workdir / "bioclip_jax_run.json").read_text() == run_text
    assert _same(_flat(workdir), params)


@pytest.mark.parametrize("override, named", [
    ("model=demo", "model embed_dim: 64 -> 128"),  # another architecture
    ("train.grad_clip_norm=1.0", "new state leaves"),  # another optimizer structure, same model
])
def test_another_model_or_optimizer_is_refused_and_allow_restart_starts_a_sub_folder(finished, shards,  # noqa: F811
                                                                                     override, named):
    workdir, params, run_text = finished
    with pytest.raises(InputError, match=f"holds another run than this command describes: .*{named}.*"
                                         "allow_restart=True"):
        train(_config(shards, override, "train.steps=4"), workdir, progress=False)
    assert (workdir / "bioclip_jax_run.json").read_text() == run_text
    result = train(_config(shards, override, "train.steps=2", "train.allow_restart=True"), workdir, progress=False)
    assert result.workdir.name == "restart-1" and result.step == 2
    again = train(_config(shards, override, "train.steps=3", "train.allow_restart=True"), workdir, progress=False)
    assert again.workdir.name == "restart-1" and again.history[0]["step"] == 3  # resumed there, not restart-2
    assert _same(_flat(workdir), params)  # the old run untouched
    shutil.rmtree(workdir / "restart-1")  # the next case starts from the finished run alone


def test_an_unreadable_newest_step_is_kept_aside_and_saved_again(shards, tmp_path, caplog):  # noqa: F811
    workdir = tmp_path / "run"
    train(_config(shards, "train.steps=4"), workdir, progress=False)
    for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    caplog.set_level(logging.WARNING)
    loaded = bioclip_jax.load(workdir)  # falls back quietly, as the trainer does
    assert loaded.source.endswith("(step 2)")
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0].getMessage()
    result = train(_config(shards, "train.steps=4"), workdir, progress=False)
    assert result.step == 4 and result.history[0]["step"] == 3
    assert (workdir / "checkpoints" / "4.unreadable").is_dir()  # the damaged step, kept for inspection
    assert bioclip_jax.load(workdir).source.endswith("(step 4)")  # repaired: step 4 saved again
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # each step once, though steps 3 and 4 ran twice


@pytest.mark.integration  # the CLI in a subprocess
def test_embed_from_a_run_whose_newest_arrays_are_damaged_warns_once_and_exits_cleanly(finished, tmp_path):
    """A read that fails on one array while the others are still in flight (Orbax closed its event loop under them:
    one "Event loop is closed" traceback per array at the end of the command)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    damaged = [f for f in (workdir / "checkpoints" / "4" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert damaged  # the array chunks, not the metadata: the read fails midway, not before it starts
    for f in damaged:
        f.write_bytes(b"garbage")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "a.jpg")
    done = subprocess.run([sys.executable, "-m", "bioclip_jax.cli", "embed", "--model", str(workdir), "--output",
                           str(tmp_path / "e.json"), str(tmp_path / "a.jpg")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "step 4" in warnings[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["model"].endswith("(step 2)") and list(written["embeddings"]) == [str(tmp_path / "a.jpg")]


def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(shards, tmp_path, monkeypatch, capsys):  # noqa: F811
    workdir = tmp_path / "run"
    train(_config(shards, "train.steps=2"), workdir, progress=False)
    real_save = run_dir.Checkpoints.save

    def save(checkpoints, step, *args, **kwargs):
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(checkpoints, step, *args, **kwargs)

    monkeypatch.setattr(run_dir.Checkpoints, "save", save)
    with pytest.raises(ResourceError, match="no space left on device while saving step 3 .* earlier checkpoints are "
                                            "intact"):
        train(_config(shards, "train.steps=4"), workdir, progress=False)
    code = main(["train", "--config", str(CONFIG), "--workdir", str(workdir), f"--config.data.train={shards}",
                 "--config.train.steps=4"])
    err = capsys.readouterr().err
    # One line, not an exception's traceback (stderr may also hold log records of earlier tests' handlers).
    assert code == 1 and "bioclip-jax train: error: no space left on device" in err and "ResourceError" not in err
    assert bioclip_jax.load(workdir).source.endswith("(step 2)")


def test_a_gs_workdir_without_its_package_names_the_url_and_writes_nothing_locally(shards, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    from etils.epath import backend
    from fsspec.registry import _registry as fsspec_registry

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: importing it raises ImportError
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(fsspec_registry, protocol, raising=False)  # imported classes
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"gs://bucket/run: .*gcsfs.*bioclip_jax\[gcs\]"):
        train(_config(shards), "gs://bucket/run", progress=False)
    with pytest.raises(InputError, match=r"gs://bucket/run: .*gcsfs"):
        bioclip_jax.load("gs://bucket/run")
    assert list(tmp_path.iterdir()) == []  # no local "gs:" folder
