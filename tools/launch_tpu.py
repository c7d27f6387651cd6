#!/usr/bin/env python
"""Launch bioclip_jax training on a Cloud TPU pod slice through a queued resource, detached from this shell, and
(with --watch) keep it alive through spot preemptions.

    python tools/launch_tpu.py --name bioclip --zone us-central2-b --accelerator v4-32 --spot \\
        --workdir gs://my-bucket/runs/bioclip --watch -- --config bioclip_vitb16 \\
        --config.data.train=/mnt/tol10m/train
    python tools/launch_tpu.py ... --dry-run -- ...   # print every command (and the worker script), run nothing

Launcher options go before `--`; everything after it is passed verbatim to `bioclip-jax train` on every worker
(a launcher option found after `--` is an error). What happens, in order:
  1. build a wheel of this checkout (what you have checked out is what runs; the recipes, bioclip_jax/configs/, are
     inside it: --config bioclip_vitb16 or configs/bioclip_vitb16.py);
  2. a gs:// workdir: `gcloud storage ls gs://BUCKET` must succeed before anything is created;
  3. create the queued resource (spot / best-effort / reserved / on-demand) with the runtime version of the
     accelerator's generation, or reuse it when it exists; wait until it is ACTIVE;
  4. on every worker: a Python >= 3.11 venv made with uv (`pip install --user uv`, or uv's installer when pip is
     missing; `uv python install` fetches a standalone CPython, the images ship 3.10), `jax[tpu]` in it, pinned to
     the jax installed here (else TESTED_JAX; --jax overrides);
  5. copy the wheel, configs/ and train.sh to ~/bioclip_run on every worker, install the wheel;
  6. `train.sh start` on every worker: `bioclip-jax train --distributed --workdir WORKDIR ARGS` under setsid+nohup,
     so the ssh session can end. Logs: WORKDIR/logs/worker-<i>.log. For a gs:// workdir each worker writes
     ~/bioclip_run/logs/worker-<i>.log and copies it to WORKDIR/logs/ with `gcloud storage cp` every
     --log-sync-seconds and at exit (a preempted worker loses at most that much log; a restarted one appends).
  7. --watch: every --poll-seconds, look at the queued resource; when it is SUSPENDED (spot preemption), FAILED or
     gone, delete and recreate it and redo 4-6 with the same command and workdir, at most --max-restarts times.
     Training resumes from the workdir's newest checkpoint by design. Stops when every worker's training exits
     (0 when all finished). --ensure does one such pass and exits: run it from cron instead of keeping --watch up.
Without --watch/--ensure the launcher returns as soon as training has started on every worker. Cron, every 10 min:
    */10 * * * * cd ~/bioclip_jax && python tools/launch_tpu.py ...same options... --ensure -- ... >> ensure.log 2>&1
(--ensure recreates a lost slice but does not count recreations: cron's schedule is the bound; it never restarts a
run that failed, and stops doing anything once every worker has finished.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
REMOTE_RUN = "~/bioclip_run"  # on every worker: venv, wheel, configs/, train.sh, pid and exit files
UV = "~/.local/bin/uv"

# Google's TPU software versions per generation (cloud.google.com/tpu/docs/runtimes): v4 runs the plain Ubuntu
# image; v5e, v5p and v6e need their own.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
# Queued-resource states (gcloud ... queued-resources describe --format='value(state.state)').
ACTIVE = "ACTIVE"
RECREATE_STATES = {"SUSPENDED", "FAILED"}  # spot preemption leaves the queued resource SUSPENDED
STATUS_PREFIX = "bioclip-status:"
RECIPES = REPO / "bioclip_jax" / "configs"  # inside the wheel; configs/ at the top is a link to it
# The workers get the jax this checkout runs: the one installed here, else this (the version the suite last passed
# with). An unpinned jax[tpu] would install whatever is newest on the day the slice is created.
TESTED_JAX = "0.10.2"
MAX_FAILED_PASSES = 3  # --watch: consecutive passes with a failed gcloud step before giving up


class UsageError(Exception):
    """Bad command line or unreachable workdir: one line on stderr, exit 2, nothing created."""


class LaunchError(Exception):
    """A gcloud step failed while launching: one line on stderr, exit 1."""


# --------------------------------------------------------------------------------------------------- the slice
@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str  # gcloud's --accelerator-type
    generation: str  # v4, v5e, v5p, v6e
    chips: int
    hosts: int  # TPU VM workers; each runs one training process


def parse_accelerator(name: str) -> Slice:
    """v4-N and v5p-N count TensorCores (2 per chip); v5litepod-N (alias v5e-N) and v6e-N count chips. Hosts hold
    4 chips in multi-host slices; v5e and v6e slices of 8 chips or fewer are one host (Cloud TPU docs, "TPU
    versions": v4-32 = 16 chips on 4 hosts, v5litepod-256 = 64 hosts x 4 chips, v6e-64 = 16 hosts x 4 chips)."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if not match:
        raise UsageError(f"--accelerator {name!r}: expected v4-N, v5p-N, v5litepod-N (or v5e-N) or v6e-N")
    family, size = match.group(1), int(match.group(2))
    if family in ("v4", "v5p"):
        if size < 8 or size % 8:
            raise UsageError(f"--accelerator {name!r}: {family} sizes count TensorCores: 8, 16, 32, ...")
        chips = size // 2
        return Slice(name, family, chips, max(1, chips // 4))
    generation = "v5e" if family in ("v5litepod", "v5e") else "v6e"
    if size not in (1, 4, 8, 16, 32, 64, 128, 256):
        raise UsageError(f"--accelerator {name!r}: {generation} slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips")
    accelerator = f"v5litepod-{size}" if generation == "v5e" else name
    return Slice(accelerator, generation, size, 1 if size <= 8 else size // 4)


# ---------------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        raise UsageError(message)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch_tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.add_argument("--name", required=True, help="TPU VM (node) name")
    p.add_argument("--queued-resource", default="", help="queued resource id (default: NAME-qr)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--accelerator", required=True, help="v4-32, v5litepod-256 (= v5e-256), v5p-128, v6e-64, ...")
    p.add_argument("--runtime-version", default="", help="TPU software version (default: the generation's, "
                                                         + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items())
                                                         + ")")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible; use with --watch)")
    capacity.add_argument("--best-effort", action="store_true", help="best-effort (preemptible) capacity")
    capacity.add_argument("--reserved", action="store_true", help="capacity from the project's reservation")
    p.add_argument("--workdir", required=True,
                   help="run directory seen by every worker: gs://bucket/path (checked first), or a shared disk")
    p.add_argument("--allow-local-workdir", action="store_true",
                   help="accept a non-gs:// workdir on a multi-worker slice (a disk mounted on every worker)")
    p.add_argument("--python", default="3.11", help="Python of the workers' venv (>= 3.11)")
    p.add_argument("--jax", help="pip requirement installed before the package (default: jax[tpu]==the jax installed "
                                 f"here, else {TESTED_JAX})")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the training process (repeatable), e.g. LIBTPU_INIT_ARGS=...")
    p.add_argument("--log-sync-seconds", type=int, default=300, help="gs:// workdir: copy the logs this often")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true", help="stay up: recreate the slice after preemption and restart")
    mode.add_argument("--ensure", action="store_true", help="one --watch pass, then exit (for cron)")
    p.add_argument("--poll-seconds", type=int, default=300,
                   help="--watch: seconds between looks (at most 60 while the slice is being created)")
    p.add_argument("--max-restarts", type=int, default=10, help="--watch: recreations before giving up")
    p.add_argument("--ssh-retries", type=int, default=3, help="tries of each ssh/scp (fresh VMs refuse ssh a while)")
    p.add_argument("--dry-run", action="store_true", help="print every command and the worker script, run nothing")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before `--`, training arguments after it (verbatim). A launcher option after `--` is an error
    (it would otherwise reach training while the real gcloud commands run)."""
    parser = make_parser()
    if "--" not in argv:
        raise UsageError("pass the training arguments after --, e.g. -- --config bioclip_vitb16")
    split = argv.index("--")
    own, train_args = argv[:split], argv[split + 1:]
    launcher_options = set(parser._option_string_actions)
    for arg in train_args:
        if arg.split("=", 1)[0] in launcher_options:
            raise UsageError(f"{arg.split('=', 1)[0]} after --: it is a launcher option, put it before -- "
                             "(everything after -- goes to bioclip-jax train)")
    args = parser.parse_args(own)
    if not any(a == "--config" or a.startswith("--config=") for a in train_args):
        raise UsageError("pass the training arguments after --, e.g. -- --config bioclip_vitb16")
    if not re.fullmatch(r"3\.(\d+)", args.python) or int(args.python.split(".")[1]) < 11:
        raise UsageError(f"--python {args.python!r}: expected 3.11 or newer (jax >= 0.10 has no older wheels)")
    for item in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, re.S):
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
    if min(args.poll_seconds, args.log_sync_seconds) < 1 or args.max_restarts < 0 or args.ssh_retries < 1:
        raise UsageError("--poll-seconds, --log-sync-seconds and --ssh-retries must be >= 1, --max-restarts >= 0")
    args.slice = parse_accelerator(args.accelerator)
    args.runtime_version = args.runtime_version or RUNTIME_VERSIONS[args.slice.generation]
    args.queued_resource = args.queued_resource or f"{args.name}-qr"
    args.workdir = args.workdir.rstrip("/") or args.workdir
    if not is_gcs(args.workdir) and args.slice.hosts > 1 and not args.allow_local_workdir:
        raise UsageError(f"--workdir {args.workdir!r} is not gs:// but {args.slice.accelerator} has "
                         f"{args.slice.hosts} workers that must all see the same run directory; use gs://BUCKET/PATH,"
                         " or --allow-local-workdir for a disk mounted at that path on every worker")
    check_config_path(train_args)
    args.jax, args.jax_source = jax_requirement(args.jax)
    return args, train_args


def check_config_path(train_args: list[str]) -> None:
    """A recipe (`bioclip_vitb16`, `configs/bioclip_vitb16.py`: configs/ is bioclip_jax/configs, inside the wheel)
    must exist here; any other path must exist on every worker (said, not checked)."""
    for i, arg in enumerate(train_args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            train_args[i + 1] if arg == "--config" and i + 1 < len(train_args) else None
        if path is None:
            continue
        folder, name = os.path.split(path)
        if folder in ("", "configs"):
            if not (RECIPES / f"{name.removesuffix('.py')}.py").is_file():
                recipes = ", ".join(sorted(p.stem for p in RECIPES.glob("*.py") if p.stem != "__init__"))
                raise UsageError(f"--config {path}: no such recipe (recipes: {recipes}); a config of your own goes in "
                                 "configs/ (it travels in the wheel) or at a path every worker sees")
        else:
            print(f"launch_tpu.py: note: --config {path} is not a recipe (bioclip_jax/configs/, inside the wheel): "
                  "it must exist at that path on every worker", file=sys.stderr)


def jax_requirement(given: str | None) -> tuple[str, str]:
    """(the jax requirement for the workers, where it came from)."""
    if given:
        return given, "--jax"
    try:
        return f"jax[tpu]=={importlib.metadata.version('jax')}", "the jax installed here"
    except importlib.metadata.PackageNotFoundError:
        return f"jax[tpu]=={TESTED_JAX}", "TESTED_JAX in tools/launch_tpu.py; no jax installed here"


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def bucket_of(url: str) -> str:
    bucket = url[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise UsageError(f"--workdir {url!r}: expected gs://BUCKET/PATH")
    return f"gs://{bucket}"


# ------------------------------------------------------------------------------------------------- commands
def _scope(args) -> list[str]:
    return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def wheel_name() -> str:
    """The wheel `pip wheel` builds from this checkout: the name from pyproject.toml, the version from the one place
    it is written (bioclip_jax/__init__.py; pyproject.toml reads it from there), without importing the package."""
    with open(REPO / "pyproject.toml", "rb") as f:
        name = tomllib.load(f)["project"]["name"]
    version = re.search(r'^__version__ = "([^"]+)"', (REPO / "bioclip_jax" / "__init__.py").read_text(), re.M)
    return f"{name}-{version.group(1)}-py3-none-any.whl"


def build_wheel_command(out_dir: str) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out_dir, str(REPO)]


def bucket_check_command(args) -> list[str]:
    return ["gcloud", "storage", "ls", bucket_of(args.workdir)] + (["--project", args.project] if args.project else [])


def create_command(args) -> list[str]:
    capacity = ["--spot"] if args.spot else ["--best-effort"] if args.best_effort else \
        ["--reserved"] if args.reserved else []
    return ["gcloud", "compute", "tpus", "queued-resources", "create", args.queued_resource, "--node-id", args.name,
            *_scope(args), "--accelerator-type", args.slice.accelerator, "--runtime-version", args.runtime_version,
            *capacity]


def describe_command(args) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.queued_resource, *_scope(args),
            "--format=value(state.state)"]


def delete_command(args) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", args.queued_resource, *_scope(args),
            "--force", "--quiet"]


def ssh_command(args, remote: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args), f"--worker={worker}",
            "--quiet", "--command", remote]


def prepare_command(args) -> list[str]:
    """Every worker: uv, a standalone CPython >= 3.11 and a venv with jax[tpu]. Idempotent (rerun after restarts)."""
    venv = f"{REMOTE_RUN}/venv"
    remote = " && ".join([
        "set -e", f"mkdir -p {REMOTE_RUN}/logs",
        f"(test -x {UV} || python3 -m pip install --user --quiet uv || "
        "curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"{UV} python install {args.python}",
        f"(test -x {venv}/bin/python || {UV} venv --python {args.python} {venv})",
        f"{venv}/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'",
        f"{UV} pip install --quiet --python {venv}/bin/python {shlex.quote(args.jax)}"])
    return ssh_command(args, remote)


def copy_command(args, wheel: str, script: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", wheel, script, str(REPO / "configs"),
            f"{args.name}:bioclip_run/", *_scope(args), "--worker=all", "--quiet"]


def start_command(args, wheel: str) -> list[str]:
    remote = (f"cd {REMOTE_RUN} && {UV} pip install --quiet --python venv/bin/python --reinstall-package bioclip_jax "
              f"./{Path(wheel).name} && bash train.sh start")
    return ssh_command(args, remote)


def status_command(args) -> list[str]:
    return ssh_command(args, f"bash {REMOTE_RUN}/train.sh status 2>/dev/null || echo {STATUS_PREFIX} bare")


def train_command(args, train_args: list[str]) -> str:
    """The training command line on a worker (train.sh runs it in ~/bioclip_run): arguments shell-quoted."""
    return '"$RUN/venv/bin/bioclip-jax" ' + shlex.join(["train", "--distributed", "--workdir", args.workdir,
                                                         *train_args])


def worker_script(args, train_args: list[str]) -> str:
    """train.sh, copied to every worker: `start` runs training detached unless it runs or finished, `status` prints
    one line, `run` is what `start` detaches."""
    gcs = is_gcs(args.workdir)
    q = shlex.quote
    train = train_command(args, train_args)
    if gcs:
        log = '"$RUN/logs/worker-$WORKER.log"'
        remote_log = f'REMOTE_LOG={q(args.workdir + "/logs")}"/worker-$WORKER.log"'
    else:
        log = f'{q(args.workdir + "/logs")}"/worker-$WORKER.log"'
        remote_log = ""
    exports = "".join(f"  export {item.split('=', 1)[0]}={q(item.split('=', 1)[1])}\n" for item in args.env)
    sync = """
sync_log() {
  gcloud storage cp --quiet "$LOG" "$REMOTE_LOG" >/dev/null 2>&1 || echo "train.sh: cannot copy $LOG to $REMOTE_LOG" >&2
}""" if gcs else ""
    fetch_earlier = ('  gcloud storage cp --quiet "$REMOTE_LOG" "$LOG" >/dev/null 2>&1 || true  '
                     '# append to the earlier attempts\' log\n') if gcs else ""
    start_sync = (f"  (while sleep {args.log_sync_seconds}; do sync_log; done) 9>&- &\n  SYNC=$!\n") if gcs else ""
    stop_sync = '  kill "$SYNC" 2>/dev/null; sync_log\n' if gcs else ""
    return f"""#!/bin/bash
# Written by tools/launch_tpu.py for {args.name} ({args.slice.accelerator}). Usage: train.sh start|status|run
set -uo pipefail
RUN="$HOME/bioclip_run"
cd "$RUN" || exit 1
# The worker's index in the slice, from the metadata server (as jax.distributed reads it); BIOCLIP_WORKER overrides.
WORKER=${{BIOCLIP_WORKER:-$(curl -sf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}}
[[ "$WORKER" =~ ^[0-9]+$ ]] \\
  || {{ echo "train.sh: no agent-worker-number from the TPU VM metadata server (got '$WORKER')" >&2; exit 1; }}
LOG={log}
{remote_log}
# `start` takes train.lock and hands it to the detached `run`, which holds it (with training, its child; not the log
# sync loop) until it exits: no pid file to go stale or be reused after a reboot, and no moment in which a
# just-started run reads as stopped.
running() {{
  flock -n -E 75 "$RUN/train.lock" true 2>/dev/null
  [ $? = 75 ]
}}
status() {{
  if running; then echo running  # before exit_code, which `run` writes while it still holds the lock
  elif [ -f "$RUN/exit_code" ]; then [ "$(cat "$RUN/exit_code")" = 0 ] && echo finished || echo failed
  else echo stopped; fi
}}
{sync}
run() {{
  mkdir -p "$(dirname "$LOG")"
{fetch_earlier}  echo "=== $(date -u +%FT%TZ) worker $WORKER: start" >> "$LOG"
{start_sync}{exports}  {train} >> "$LOG" 2>&1
  rc=$?
  echo "=== $(date -u +%FT%TZ) worker $WORKER: exit $rc" >> "$LOG"
{stop_sync}  echo "$rc" > "$RUN/exit_code"
}}

case "${{1:-}}" in
  status) echo "{STATUS_PREFIX} $(status) worker $WORKER" ;;
  start)
    case "$(status)" in
      running) echo "worker $WORKER: training already running, log $LOG" ;;
      finished) echo "worker $WORKER: training finished (remove $RUN/exit_code to train again)" ;;
      *) exec 9>> "$RUN/train.lock"
         flock -n 9 || {{ echo "worker $WORKER: training already running, log $LOG"; exit 0; }}
         rm -f "$RUN/exit_code"  # the last attempt's exit is not this one's
         setsid nohup bash "$RUN/train.sh" run > /dev/null 2>&1 < /dev/null &
         echo "worker $WORKER: training started, log $LOG" ;;
    esac ;;
  run) run ;;
  *) echo "usage: train.sh start|status|run" >&2; exit 2 ;;
esac
"""


# ----------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Step:
    what: str
    command: list[str]


def plan(args, train_args: list[str], wheel_dir: str = "<tmpdir>") -> list[Step]:
    """Every command a launch (and --watch) may run, in order: what --dry-run prints."""
    wheel, script = f"{wheel_dir}/{wheel_name()}", f"{wheel_dir}/train.sh"
    s = args.slice
    steps = [Step("build the package wheel from this checkout", build_wheel_command(wheel_dir))]
    if is_gcs(args.workdir):
        steps.append(Step("the workdir's bucket must exist and be reachable, before anything is created",
                          bucket_check_command(args)))
    steps += [
        Step(f"create the queued resource ({s.accelerator}: {s.chips} chips, {s.hosts} workers, runtime "
             f"{args.runtime_version}) unless it exists", create_command(args)),
        Step(f"wait until its state is {ACTIVE} (every {args.poll_seconds} s)", describe_command(args)),
        Step(f"every worker: uv, Python {args.python} venv in {REMOTE_RUN}/venv, {args.jax}", prepare_command(args)),
        Step(f"copy the wheel, train.sh and configs/ to {REMOTE_RUN} on every worker", copy_command(args, wheel,
                                                                                                 script)),
        Step(f"every worker: install the wheel, start training detached; log {log_location(args)}",
             start_command(args, wheel)),
        Step("status of every worker (running|finished|failed|stopped|bare)", status_command(args)),
    ]
    if args.watch or args.ensure:
        loop = "once (--ensure)" if args.ensure else \
            f"every {args.poll_seconds} s, at most {args.max_restarts} recreations (--watch)"
        steps += [Step(f"watch {loop}: state of the queued resource", describe_command(args)),
                  Step("SUSPENDED (preempted), FAILED or gone: delete, then create again and redo the worker steps "
                       "(training resumes from the workdir's checkpoints)", delete_command(args))]
    return steps


def log_location(args) -> str:
    where = f"{args.workdir}/logs/worker-<i>.log"
    if is_gcs(args.workdir):
        where += f" (written to {REMOTE_RUN}/logs/, copied every {args.log_sync_seconds} s and at exit)"
    return where


def format_plan(args, train_args: list[str]) -> str:
    s = args.slice
    lines = [f"# {s.accelerator}: {s.chips} chips on {s.hosts} workers ({s.generation}), runtime version "
             f"{args.runtime_version}, Python {args.python} venv; workdir {args.workdir}",
             f"# jax on the workers: {args.jax} ({args.jax_source})"]
    for i, step in enumerate(plan(args, train_args), 1):
        lines += [f"# {i}. {step.what}", shlex.join(step.command)]
    lines += [f"# train.sh (copied to {REMOTE_RUN} on every worker):", worker_script(args, train_args)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- execution
Runner = Callable[..., subprocess.CompletedProcess]


def run_subprocess(command: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=capture, text=True)  # argument lists: no local shell


class Launcher:
    """The launch, --watch and --ensure passes over an injectable command runner and clock (tests fake both)."""

    def __init__(self, args, train_args: list[str], runner: Runner = run_subprocess,
                 sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] = functools.partial(print, flush=True)):
        self.args, self.train_args, self.runner, self.sleep, self.say = args, train_args, runner, sleep, say
        self.files_dir: str | None = None

    def _run(self, step: Step, capture: bool = False, tries: int = 1) -> subprocess.CompletedProcess:
        for attempt in range(1, tries + 1):
            self.say(f"==> {step.what}: {shlex.join(step.command)}")
            done = self.runner(step.command, capture=capture)
            if done.returncode == 0:
                return done
            if attempt < tries:
                self.say(f"    failed (exit {done.returncode}), retrying in 30 s ({attempt}/{tries})")
                self.sleep(30)
        detail = _reason(done.stderr) if capture else f"exit {done.returncode}"
        raise LaunchError(f"{step.what} failed: {detail}")

    def check_workdir(self) -> None:
        if not is_gcs(self.args.workdir):
            return
        command = bucket_check_command(self.args)
        done = self.runner(command, capture=True)
        if done.returncode:
            raise UsageError(f"--workdir {self.args.workdir}: bucket {bucket_of(self.args.workdir)} is not reachable "
                             f"({shlex.join(command)}: {_reason(done.stderr)})")

    def state(self) -> str | None:
        """The queued resource's state, None when it does not exist."""
        done = self.runner(describe_command(self.args), capture=True)
        if done.returncode:
            if re.search(r"not.?found", done.stderr or "", re.I):
                return None
            raise LaunchError(f"cannot read queued resource {self.args.queued_resource}: {_reason(done.stderr)}")
        return done.stdout.strip() or "UNKNOWN"

    def worker_files(self) -> tuple[str, str]:
        """The wheel and train.sh, made once per launcher run."""
        if self.files_dir is None:
            self.files_dir = tempfile.mkdtemp(prefix="bioclip_tpu_")
            self._run(Step("build the package wheel", build_wheel_command(self.files_dir)))
            Path(self.files_dir, "train.sh").write_text(worker_script(self.args, self.train_args))
        wheel = next(Path(self.files_dir).glob("bioclip_jax-*.whl"), None)
        if wheel is None:
            raise LaunchError(f"pip wheel wrote no bioclip_jax wheel into {self.files_dir}")
        return str(wheel), f"{self.files_dir}/train.sh"

    def training_status(self) -> str:
        """finished (every worker), running, failed (any worker), or stopped (some worker has no live training)."""
        done = self._run(Step("status of every worker", status_command(self.args)), capture=True,
                         tries=self.args.ssh_retries)
        words = [line.split()[1] for line in done.stdout.splitlines()
                 if line.startswith(STATUS_PREFIX) and len(line.split()) > 1]
        if "failed" in words:
            return "failed"
        if not words or {"stopped", "bare"} & set(words):
            return "stopped"
        return "finished" if set(words) == {"finished"} else "running"

    def start_training(self) -> None:
        wheel, script = self.worker_files()
        tries = self.args.ssh_retries
        self._run(Step("every worker: Python venv with jax[tpu]", prepare_command(self.args)), tries=tries)
        self._run(Step("copy the wheel, train.sh, configs/", copy_command(self.args, wheel, script)), tries=tries)
        self._run(Step("every worker: install, start training", start_command(self.args, wheel)), tries=tries)
        self.say(f"training started on {self.args.slice.hosts} workers; logs: {log_location(self.args)}")

    def reconcile(self, restart_failed: bool) -> str:
        """One pass: 'created' / 'recreated' (slice asked for), 'waiting' (not ACTIVE yet), 'started', 'running',
        'finished', 'failed'."""
        state = self.state()
        if state is None or state in RECREATE_STATES:
            if state is not None:
                self.say(f"queued resource {self.args.queued_resource} is {state}: deleting it to recreate it")
                self._run(Step("delete the queued resource", delete_command(self.args)), capture=True)
            self._run(Step("create the queued resource", create_command(self.args)), capture=True)
            return "created" if state is None else "recreated"
        if state != ACTIVE:
            self.say(f"queued resource {self.args.queued_resource}: {state}")
            return "waiting"
        status = self.training_status()
        if status in ("running", "finished") or (status == "failed" and not restart_failed):
            return status
        self.start_training()
        return "started"

    def loop(self) -> int:
        """Launch (return once training started), --watch (until training exits) or --ensure (one pass).
        --watch outlives a failed ssh/gcloud step (the slice may be going away under it) up to MAX_FAILED_PASSES
        passes in a row."""
        a = self.args
        self.check_workdir()
        restarts, first, failed_passes = 0, True, 0
        while True:
            try:
                outcome = self.reconcile(restart_failed=not (a.watch or a.ensure))
                failed_passes = 0
            except LaunchError as e:
                failed_passes += 1
                if not a.watch or failed_passes >= MAX_FAILED_PASSES:
                    raise
                self.say(f"{e}; trying again in {a.poll_seconds} s ({failed_passes}/{MAX_FAILED_PASSES})")
                self.sleep(a.poll_seconds)
                continue
            if outcome == "recreated" or (outcome == "created" and not first):
                restarts += 1
                self.say(f"recreation {restarts} of at most {a.max_restarts}")
                if restarts > a.max_restarts and not a.ensure:
                    raise LaunchError(f"the slice was lost {restarts} times (--max-restarts {a.max_restarts})")
            first = False
            if outcome == "finished":
                self.say("training finished on every worker")
                return 0
            if outcome == "failed":
                self.say(f"training exited with an error on some worker: see {log_location(a)} "
                         "(rerun without --watch/--ensure to start it again)")
                return 1
            if a.ensure or (outcome in ("started", "running") and not a.watch):
                if outcome == "running" and not a.ensure:
                    self.say(f"training is already running; logs: {log_location(a)}")
                return 0
            creating = outcome in ("created", "recreated", "waiting")
            self.sleep(min(a.poll_seconds, 60) if creating else a.poll_seconds)


def _reason(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"  # gcloud puts the reason in its last line (ERROR: ...)


def main(argv: list[str] | None = None, runner: Runner = run_subprocess,
         sleep: Callable[[float], None] = time.sleep) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("-h", "--help"):
            make_parser().print_help()
            return 0
        args, train_args = parse_args(argv)
        if args.dry_run:
            print(format_plan(args, train_args))
            return 0
        launcher = Launcher(args, train_args, runner, sleep)
        try:
            return launcher.loop()
        finally:
            if launcher.files_dir:
                shutil.rmtree(launcher.files_dir, ignore_errors=True)
    except UsageError as e:
        print(f"launch_tpu.py: error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"launch_tpu.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
