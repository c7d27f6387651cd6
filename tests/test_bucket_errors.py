"""A gs:// path that cannot be used fails in seconds with one line naming the URL and the cause, whichever command
touches it first: a missing bucket or no credentials exit 2, an unreachable endpoint exits 1, and nothing retries
for a minute or prints a traceback. No real network traffic: a fake GCS server, closed or silent localhost ports."""

from __future__ import annotations

import socket
import time

import pytest

import bioclip_jax
from bioclip_jax import cli, paths
from bioclip_jax.errors import InputError, UnreachableError

pytest.importorskip("gcsfs")

COMMANDS = {  # each command with the gs:// path where it first touches it
    "train": lambda url: ["train", "--config", "demo", "--workdir", url],
    "load": None,
    "convert": lambda url: ["convert", url, "unused-dst"],
    "convert-dst": lambda url: ["convert", "tiny", url],
    "embed": lambda url: ["embed", "--model", url, "unused.jpg"],
    "eval": lambda url: ["eval", "--model", url, "--out", "unused-out"],
}


def _run(command: str, url: str, capsys) -> tuple[int, str, float]:
    """(exit code, standard error, seconds) of `command` on `url`; `load` is the Python API, its error as the CLI
    would print it."""
    start = time.monotonic()
    if COMMANDS[command] is None:
        with pytest.raises((InputError, UnreachableError)) as error:
            bioclip_jax.load(url)
        code, err = (2 if isinstance(error.value, InputError) else 1), f"{error.value}\n"
    else:
        code = cli.main(COMMANDS[command](url))
        err = capsys.readouterr().err
    return code, err, time.monotonic() - start


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """Nothing that google.auth.default finds: no key file, no gcloud login, not on a GCE VM."""
    from google.auth.compute_engine import _metadata

    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setattr(_metadata, "is_on_gce", lambda request: False)


@pytest.fixture(scope="module")
def fake_server():
    from test_gcs_run import _start_server

    server, url = _start_server()
    yield url
    server.kill()
    server.wait()


@pytest.mark.integration  # starts fake-gcs-server
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_bucket_is_named_in_one_line(command, fake_server, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_server)
    url = f"gs://no-such-bucket-{command}/run"
    code, err, seconds = _run(command, url, capsys)
    assert code == 2 and seconds < 15
    assert err.count("\n") == 1 and url in err and "no such bucket gs://no-such-bucket" in err, err
    assert list(tmp_path.iterdir()) == []  # no local `gs:` folder, nothing half-written


@pytest.mark.parametrize("command", ["train", "load", "embed"])
def test_without_credentials_the_url_and_the_login_are_named(command, no_credentials, capsys):
    url = "gs://some-bucket/run"
    code, err, seconds = _run(command, url, capsys)
    assert code == 2 and seconds < 15
    assert err.count("\n") == 1 and url in err and "no Google Cloud credentials" in err, err
    assert "gcloud auth application-default login" in err


@pytest.mark.parametrize("command", ["train", "load", "convert"])
def test_an_unreachable_endpoint_exits_1_in_one_line(command, monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    url = "gs://bucket/run"
    code, err, seconds = _run(command, url, capsys)
    assert code == 1 and seconds < 15
    assert err.count("\n") == 1 and url in err and f"cannot reach {endpoint}" in err, err


def test_an_endpoint_that_never_answers_times_out_without_retrying(monkeypatch):
    """A firewall that drops packets: the probe gives up after its timeout instead of gcsfs's minute of retries."""
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(paths, "PROBE_TIMEOUT_S", 1)
        start = time.monotonic()
        with pytest.raises(UnreachableError, match="gs://silent/run: cannot reach http://127.0.0.1"):
            paths.check_reachable("gs://silent/run")
        assert time.monotonic() - start < 5


@pytest.mark.integration  # starts fake-gcs-server
def test_a_reachable_bucket_is_probed_once(fake_server, monkeypatch):
    import requests

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_server)
    requests.post(f"{fake_server}/storage/v1/b", json={"name": "probed"}, timeout=5).raise_for_status()
    paths.check_reachable("gs://probed/a")
    monkeypatch.setattr(requests.Session, "get", lambda *a, **k: pytest.fail("probed twice"))
    assert str(paths.resolve("gs://probed/b/c")) == "gs://probed/b/c"
