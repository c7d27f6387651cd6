"""tools/launch_tpu.py: the printed plan per slice, options only before `--`, the workdir checks, the watch loop
(preemption -> recreate -> restart) over a fake gcloud, and the worker script run for real in bash. gcloud never runs:
the launcher's command runner and clock are injected."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "tools" / "launch_tpu.py")
launch_tpu = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = launch_tpu  # dataclasses look their module up there
_spec.loader.exec_module(launch_tpu)

TRAIN = ["--config", "configs/bioclip_vitb16.py", "--config.data.train=/mnt/tree of life/train",
         "--config.train.lr=2e-4"]


def _never(command, capture=False):
    raise AssertionError(f"a command ran: {command}")


def _dry_run(capsys, *options, train=TRAIN):
    code = launch_tpu.main(["--name", "bioclip", "--zone", "us-central2-b", *options, "--dry-run", "--", *train],
                           runner=_never, sleep=_never)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("accelerator,gcloud_type,runtime,chips,hosts", [
    ("v4-32", "v4-32", "tpu-ubuntu2204-base", 16, 4),
    ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite", 256, 64),
    ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite", 256, 64),
    ("v6e-64", "v6e-64", "v2-alpha-tpuv6e", 64, 16),
])
def test_dry_run_prints_the_plan(capsys, accelerator, gcloud_type, runtime, chips, hosts):
    code, out, _ = _dry_run(capsys, "--accelerator", accelerator, "--spot", "--workdir", "gs://bucket/runs/b16",
                            "--watch")
    assert code == 0
    assert f"# {gcloud_type}: {chips} chips on {hosts} workers" in out and f"runtime version {runtime}" in out
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud")]
    verbs = [c[2] if c[1] == "storage" else f"{c[3]} {c[4]}" for c in commands]
    assert verbs == ["ls", "queued-resources create", "queued-resources describe", "tpu-vm ssh", "tpu-vm scp",
                     "tpu-vm ssh", "tpu-vm ssh", "queued-resources describe", "queued-resources delete"]
    assert commands[0] == ["gcloud", "storage", "ls", "gs://bucket"]  # checked before the create
    create = commands[1]
    assert create[create.index("--accelerator-type") + 1] == gcloud_type
    assert create[create.index("--runtime-version") + 1] == runtime
    assert create[create.index("--node-id") + 1] == "bioclip" and "--spot" in create
    workers = [c for c in commands if c[3] == "tpu-vm"]
    assert workers and all("--worker=all" in c for c in workers)
    prepare = workers[0][workers[0].index("--command") + 1]
    assert "uv venv --python 3.11" in prepare and "uv python install 3.11" in prepare
    assert f"'jax[tpu]=={importlib.metadata.version('jax')}'" in prepare  # the jax this checkout runs, pinned
    assert "bash train.sh start" in workers[2][-1]
    # The training command inside train.sh: the arguments after -- verbatim, shell-quoted.
    assert ('"$RUN/venv/bin/bioclip-jax" train --distributed --workdir gs://bucket/runs/b16 --config '
            "configs/bioclip_vitb16.py '--config.data.train=/mnt/tree of life/train' --config.train.lr=2e-4") in out
    assert "gs://bucket/runs/b16/logs/worker-<i>.log" in out
    assert 'REMOTE_LOG=gs://bucket/runs/b16/logs"/worker-$WORKER.log"' in out
    assert 'LOG="$RUN/logs/worker-$WORKER.log"' in out


def test_explicit_runtime_version_and_capacity(capsys):
    code, out, _ = _dry_run(capsys, "--accelerator", "v5p-128", "--runtime-version", "v2-alpha-tpuv5-custom",
                            "--best-effort", "--python", "3.12", "--workdir", "gs://b/r")
    assert code == 0 and "# v5p-128: 64 chips on 16 workers" in out
    create = next(shlex.split(line) for line in out.splitlines()
                  if line.startswith("gcloud") and " create " in line)
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5-custom" and "--best-effort" in create
    assert "uv venv --python 3.12" in out and "delete" not in out  # no --watch: no recreation step


@pytest.mark.parametrize("after", ["--dry-run", "--zone=x", "--watch", "--workdir"])
def test_launcher_option_after_double_dash_is_an_error(capsys, after):
    code = launch_tpu.main(["--name", "b", "--zone", "z", "--accelerator", "v4-32", "--workdir", "gs://b/r", "--",
                            "--config", "c.py", after], runner=_never, sleep=_never)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{after.split('=')[0]} after --: it is a launcher option" in err


@pytest.mark.parametrize("argv,message", [
    (["--workdir", "gs://b/r", "--accelerator", "v4-32", "--dry-run"], "pass the training arguments after --"),
    (["--workdir", "gs://b/r", "--accelerator", "v3-8", "--dry-run", "--", "--config", "c"], "--accelerator 'v3-8'"),
    (["--workdir", "gs://b/r", "--accelerator", "v5e-12", "--dry-run", "--", "--config", "c"], "have 1, 4, 8"),
    (["--workdir", "gs://b/r", "--accelerator", "v4-32", "--python", "3.10", "--dry-run", "--", "--config", "c"],
     "--python '3.10': expected 3.11 or newer"),
    (["--workdir", "runs/x", "--accelerator", "v6e-64", "--dry-run", "--", "--config", "c"],
     "--workdir 'runs/x' is not gs:// but v6e-64 has 16 workers"),
    (["--workdir", "gs://b/r", "--accelerator", "v4-32", "--bogus", "--dry-run", "--", "--config", "c"],
     "unrecognized arguments: --bogus"),
])
def test_bad_command_lines_are_one_line_errors(capsys, argv, message):
    code = launch_tpu.main(["--name", "b", "--zone", "z", *argv], runner=_never, sleep=_never)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("config", ["bioclip_vitb16", "bioclip2_vitl14.py", "configs/bioclip_vitb16.py"])
def test_a_recipe_name_travels_in_the_wheel_without_a_note(capsys, config):
    """The README's own command line: recipes are inside the package."""
    code, out, err = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r", train=["--config", config])
    assert code == 0 and err == "" and f"--config {config}" in out


def test_config_must_travel_or_be_said_to_exist_on_the_workers(capsys):
    for config in ("configs/bioclip_vitb61.py", "bioclip_vitb61"):
        code, _, err = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r", train=["--config", config])
        recipes = "bioclip2_vitl14, bioclip_vitb16, demo, finetune"
        assert code == 2 and f"--config {config}: no such recipe (recipes: {recipes})" in err
    code, out, err = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r",
                              train=["--config=/mnt/shared/my_config.py"])
    assert code == 0 and "note: --config /mnt/shared/my_config.py is not a recipe" in err
    assert "--config=/mnt/shared/my_config.py" in out


def test_the_workers_jax_is_pinned_and_the_plan_says_where_from(capsys, monkeypatch):
    version = importlib.metadata.version("jax")
    _, out, _ = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r")
    assert f"# jax on the workers: jax[tpu]=={version} (the jax installed here)" in out
    _, out, _ = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r", "--jax", "jax[tpu]==0.9.9")
    assert "# jax on the workers: jax[tpu]==0.9.9 (--jax)" in out and "'jax[tpu]==0.9.9'" in out

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    _, out, _ = _dry_run(capsys, "--accelerator", "v4-8", "--workdir", "gs://b/r")
    assert f"jax[tpu]=={launch_tpu.TESTED_JAX} (TESTED_JAX in tools/launch_tpu.py; no jax installed here)" in out


def test_local_workdir_is_fine_on_one_host_or_when_allowed(capsys):
    code, out, _ = _dry_run(capsys, "--accelerator", "v5litepod-8", "--workdir", "/data/run")
    assert code == 0 and "8 chips on 1 workers" in out and "gcloud storage" not in out
    assert "LOG=/data/run/logs\"/worker-$WORKER.log\"" in out
    code, _, _ = _dry_run(capsys, "--accelerator", "v4-32", "--workdir", "/nfs/run", "--allow-local-workdir")
    assert code == 0


class FakeGcloud:
    """Answers the launcher's commands from a script of queued-resource states and worker statuses."""

    def __init__(self, states, statuses, bucket_ok=True):
        self.states, self.statuses, self.bucket_ok, self.calls = list(states), list(statuses), bucket_ok, []

    def __call__(self, command, capture=False):
        self.calls.append(command)
        ok = subprocess.CompletedProcess(command, 0, "", "")
        if command[1:3] == ["-m", "pip"]:  # build the wheel
            Path(command[command.index("-w") + 1], "bioclip_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
            return ok
        if command[1] == "storage":
            return ok if self.bucket_ok else subprocess.CompletedProcess(
                command, 1, "", "ERROR: (gcloud.storage.ls) gs://b: bucket does not exist")
        if "describe" in command:
            state = self.states.pop(0)
            if state is None:
                return subprocess.CompletedProcess(command, 1, "", "ERROR: NOT_FOUND: queued resource not found")
            return subprocess.CompletedProcess(command, 0, state + "\n", "")
        if command[-1].startswith("bash ~/bioclip_run/train.sh status"):
            return subprocess.CompletedProcess(command, 0, "".join(
                f"bioclip-status: {s} worker {i}\n" for i, s in enumerate(self.statuses.pop(0))), "")
        return ok

    def verbs(self):
        names = {"create": "create", "delete": "delete", "scp": "copy"}
        out = []
        for c in self.calls:
            if "describe" in c or c[1:3] == ["-m", "pip"] or c[1] == "storage":
                continue
            if c[-1].startswith("bash ~/bioclip_run/train.sh status"):
                out.append("status")
            elif "ssh" in c:
                out.append("start" if "train.sh start" in c[-1] else "prepare")
            else:
                out.append(next(v for k, v in names.items() if k in c))
        return out


def _launch(fake, *options):
    sleeps = []
    code = launch_tpu.main(["--name", "b", "--zone", "z", "--accelerator", "v4-16", "--spot", "--workdir",
                            "gs://b/run", "--poll-seconds", "7", *options, "--", *TRAIN],
                           runner=fake, sleep=sleeps.append)
    return code, sleeps


def test_watch_recreates_a_preempted_slice_and_restarts_training(capsys):
    fake = FakeGcloud(states=[None, "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED", "PROVISIONING",
                              "ACTIVE", "ACTIVE"],
                      statuses=[["bare", "bare"], ["running", "running"], ["bare", "bare"],
                                ["finished", "finished"]])
    code, sleeps = _launch(fake, "--watch")
    assert code == 0
    assert fake.verbs() == ["create", "status", "prepare", "copy", "start", "status", "delete", "create", "status",
                            "prepare", "copy", "start", "status"]
    assert sleeps == [7] * 7
    assert fake.calls[0] == ["gcloud", "storage", "ls", "gs://b"]
    assert "recreation 1 of at most 10" in capsys.readouterr().out
    # The same training command after the restart: the copied train.sh is the same file.
    starts = [c for c in fake.calls if "train.sh start" in c[-1]]
    assert len(starts) == 2 and starts[0] == starts[1]


def test_watch_outlives_a_few_failed_steps_but_not_many(capsys):
    class Flaky(FakeGcloud):
        def __call__(self, command, capture=False):
            if "train.sh start" in command[-1] and self.failures:
                self.failures -= 1
                self.calls.append(command)
                return subprocess.CompletedProcess(command, 255, "", "ssh: connect to host: Connection refused")
            return super().__call__(command, capture)

    fake = Flaky(states=["ACTIVE"] * 3, statuses=[["bare"] * 2, ["bare"] * 2, ["finished"] * 2])
    fake.failures = 3  # one pass: 3 tries (--ssh-retries) all refused; the next pass starts it
    assert _launch(fake, "--watch")[0] == 0
    assert fake.verbs().count("start") == 4
    fake = Flaky(states=["ACTIVE"] * 3, statuses=[["bare"] * 2] * 3)
    fake.failures = 99
    code, _ = _launch(fake, "--watch")
    assert code == 1 and "install, start training failed: exit 255" in capsys.readouterr().err


def test_watch_gives_up_after_max_restarts(capsys):
    fake = FakeGcloud(states=["FAILED", "SUSPENDED", "FAILED"], statuses=[])
    code, _ = _launch(fake, "--watch", "--max-restarts", "2")
    assert code == 1 and "lost 3 times (--max-restarts 2)" in capsys.readouterr().err


def test_launch_returns_once_started_and_ensure_is_one_pass(capsys):
    fake = FakeGcloud(states=["ACTIVE"], statuses=[["stopped", "bare"]])
    assert _launch(fake)[0] == 0 and fake.verbs() == ["status", "prepare", "copy", "start"]
    fake = FakeGcloud(states=["ACTIVE"], statuses=[["running", "running"]])
    assert _launch(fake, "--ensure")[0] == 0 and fake.verbs() == ["status"]
    fake = FakeGcloud(states=["ACTIVE"], statuses=[["running", "failed"]])
    assert _launch(fake, "--ensure")[0] == 1 and fake.verbs() == ["status"]  # a crash is not restarted blindly
    fake = FakeGcloud(states=["ACTIVE"], statuses=[["failed", "failed"]])
    assert _launch(fake)[0] == 0 and fake.verbs()[-1] == "start"  # an explicit launch starts it again


def test_unreachable_bucket_stops_before_anything_is_created(capsys):
    fake = FakeGcloud(states=[], statuses=[], bucket_ok=False)
    code, _ = _launch(fake, "--watch")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bucket gs://b is not reachable" in err and "bucket does not exist" in err
    assert all(c[1] == "storage" for c in fake.calls)


# ------------------------------------------------------------------------ the worker script, run here in bash
def _worker_home(tmp_path, workdir, exit_code=0):
    """A fake TPU VM home: ~/bioclip_run with train.sh and a bioclip-jax that records its arguments."""
    run = tmp_path / "home" / "bioclip_run"
    (run / "venv" / "bin").mkdir(parents=True)
    fake_train = run / "venv" / "bin" / "bioclip-jax"
    fake_train.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\"\necho \"XLA_FLAGS=$XLA_FLAGS\"\nexit {exit_code}\n")
    fake_train.chmod(0o755)
    args, train = launch_tpu.parse_args(["--name", "b", "--zone", "z", "--accelerator", "v4-8", "--workdir", workdir,
                                         "--env", "XLA_FLAGS=--xla_a=1 --xla_b", "--log-sync-seconds", "1", "--",
                                         *TRAIN])
    (run / "train.sh").write_text(launch_tpu.worker_script(args, train))
    return run


def _train_sh(run, command, tmp_path, path_prefix=""):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "BIOCLIP_WORKER": "3",
           "PATH": path_prefix + os.environ["PATH"]}
    return subprocess.run(["bash", str(run / "train.sh"), command], capture_output=True, text=True, env=env,
                          timeout=30)


def _wait_finished(run, tmp_path, path_prefix=""):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = _train_sh(run, "status", tmp_path, path_prefix).stdout.split()
        if status[1] != "running":
            return status
        time.sleep(0.1)
    raise AssertionError("training did not finish")


@pytest.mark.integration  # runs the worker script in bash
def test_worker_script_runs_training_detached_with_logs_in_the_workdir(tmp_path):
    workdir = tmp_path / "shared run"
    run = _worker_home(tmp_path, str(workdir))
    assert _train_sh(run, "status", tmp_path).stdout.split() == ["bioclip-status:", "stopped", "worker", "3"]
    started = _train_sh(run, "start", tmp_path)
    assert started.returncode == 0 and "worker 3: training started" in started.stdout
    assert _wait_finished(run, tmp_path)[:2] == ["bioclip-status:", "finished"]
    log = (workdir / "logs" / "worker-3.log").read_text().splitlines()
    assert log[1:-1] == ["train", "--distributed", "--workdir", str(workdir), *TRAIN, "XLA_FLAGS=--xla_a=1 --xla_b"]
    assert log[-1].endswith("worker 3: exit 0")
    again = _train_sh(run, "start", tmp_path)  # finished: not started twice
    assert "training finished" in again.stdout


@pytest.mark.integration  # runs the worker script in bash
def test_worker_script_reads_running_from_start_to_exit_and_never_starts_twice(tmp_path):
    run = _worker_home(tmp_path, str(tmp_path / "w"))
    release = tmp_path / "release"
    (run / "venv" / "bin" / "bioclip-jax").write_text(f"#!/bin/bash\nuntil [ -e '{release}' ]; do sleep 0.05; done\n")
    (run / "exit_code").write_text("1\n")  # an earlier attempt failed
    assert "training started" in _train_sh(run, "start", tmp_path).stdout
    for _ in range(5):  # no moment right after the start in which it reads stopped, or the earlier failure
        assert _train_sh(run, "status", tmp_path).stdout.split()[1] == "running"
    assert "already running" in _train_sh(run, "start", tmp_path).stdout
    release.touch()
    assert _wait_finished(run, tmp_path)[1] == "finished"


@pytest.mark.integration  # runs the worker script in bash
def test_worker_script_copies_logs_to_gcs_and_keeps_earlier_attempts(tmp_path):
    bucket = tmp_path / "gcs"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_gcloud = bin_dir / "gcloud"  # `gcloud storage cp SRC DST` over a local folder standing for gs://
    fake_gcloud.write_text(f"""#!/bin/bash
[ "$1 $2" = "storage cp" ] || exit 2
shift 2; [ "$1" = --quiet ] && shift
map() {{ case "$1" in gs://*) echo "{bucket}/${{1#gs://}}" ;; *) echo "$1" ;; esac; }}
src=$(map "$1"); dst=$(map "$2")
[ -f "$src" ] || exit 1
mkdir -p "$(dirname "$dst")" && cp "$src" "$dst"
""")
    fake_gcloud.chmod(0o755)
    run = _worker_home(tmp_path, "gs://b/run", exit_code=3)
    prefix = f"{bin_dir}:"
    _train_sh(run, "start", tmp_path, prefix)
    assert _wait_finished(run, tmp_path, prefix)[1] == "failed"
    remote = bucket / "b" / "run" / "logs" / "worker-3.log"
    first = remote.read_text()
    assert "--config.data.train=/mnt/tree of life/train" in first and first.rstrip().endswith("exit 3")
    assert (run / "logs" / "worker-3.log").read_text() == first
    # A restart on a fresh worker (preemption): the log in the bucket is fetched first and appended to.
    (run / "logs" / "worker-3.log").unlink()
    (run / "exit_code").unlink()
    _train_sh(run, "start", tmp_path, prefix)
    _wait_finished(run, tmp_path, prefix)
    second = remote.read_text()
    assert second.startswith(first) and second.count(": start") == 2


@pytest.mark.integration  # runs the worker script in bash
def test_script_runs_as_a_program():
    """The file still runs as `python tools/launch_tpu.py` (the documented entry point)."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "launch_tpu.py"), "--name", "b", "--zone", "z",
                           "--accelerator", "v4-32", "--workdir", "gs://b/r", "--", "--config", "c", "--dry-run"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("launch_tpu.py: error: --dry-run after --")
