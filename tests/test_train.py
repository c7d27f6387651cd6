"""The trainer: learning, exact resume, multi-device / multi-process equivalence, resharding, preemption, recipe
pieces (decay mask, schedule, accumulation, non-finite guard) and config errors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import bioclip_jax
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.evaluate.zero_shot import validation_evaluator
from bioclip_jax.train.config import load_config
from bioclip_jax.train.optimizer import decay_mask, make_optimizer, warmup_cosine
from bioclip_jax.train.trainer import train

TESTS = Path(__file__).parent
CONFIG = TESTS / "configs" / "tiny_train.py"
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (240, 240, 240), (20, 20, 20)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 species, each its own colour (a task a few steps can start to learn), 64 records in 2 shards."""
    folder = tmp_path_factory.mktemp("train_shards")
    rng = np.random.default_rng(0)
    n = 0
    for s in range(2):
        with ShardWriter(folder / f"t-{s:05d}.array_record") as writer:
            for _ in range(32):
                k = n % 8
                pixels = np.clip(np.array(COLOURS[k]) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG")
                taxon = Taxon.from_ranks(["Animalia", "Chordata", "Aves", f"Order{k % 2}", f"Family{k % 4}",
                                          f"Genus{k}", "colorata"], f"colour bird {k}")
                writer.write(Record(f"r{n}", buf.getvalue(), taxon))
                n += 1
    return folder


def _config(shards, *overrides):
    return load_config(CONFIG, [f"data.train={shards}", *overrides])


def _params(workdir) -> dict:
    return traverse_util.flatten_dict(bioclip_jax.load(workdir).params, sep="/")


@pytest.mark.integration  # trains tiny runs end to end
def test_a_few_steps_lower_the_loss(shards, tmp_path):
    config = _config(shards, "train.steps=24", "train.lr=2e-3", f"data.val={shards}", "eval.every_steps=12")
    result = train(config, tmp_path / "run", progress=False,
                   evaluate_fn=validation_evaluator(config.data.val, config.eval.batch_size))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    assert {"images_per_second", "tflops_per_device", "lr", "logit_scale", "grad_norm", "skipped_updates",
            "data_wait_fraction"} <= set(result.history[-1])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in logged if "loss" in m]) == 24
    validation = [m for m in logged if "val/loss" in m]  # periodic validation at steps 12 and 24
    assert [m["step"] for m in validation] == [12, 24] and validation[1]["val/loss"] < validation[0]["val/loss"]
    assert 0.0 <= validation[1]["val/zero_shot_species_top1"] <= 1.0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.integration  # trains tiny runs end to end
def test_resume_is_bitwise_exact(shards, tmp_path):
    train(_config(shards), tmp_path / "straight", progress=False)
    first = train(_config(shards), tmp_path / "split", max_steps=3, progress=False)
    assert first.step == 3
    second = train(_config(shards), tmp_path / "split", progress=False)  # the same command again: resumes at 3
    assert second.step == 6 and second.history[0]["step"] == 4
    straight, split = _params(tmp_path / "straight"), _params(tmp_path / "split")
    assert straight.keys() == split.keys()
    for key in straight:
        assert straight[key].tobytes() == split[key].tobytes(), key


@pytest.mark.integration  # trains tiny runs end to end
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(shards, tmp_path, caplog):
    train(_config(shards), tmp_path / "run", max_steps=4, progress=False)
    latest = tmp_path / "run" / "checkpoints" / "4" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    result = train(_config(shards), tmp_path / "run", max_steps=5, progress=False)
    assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
    assert result.history[0]["step"] == 3  # restarted after step 2, the previous checkpoint


def test_decay_mask_is_open_clips_rule():
    import open_clip
    from conftest import TINY_OPEN_CLIP_CFG

    from bioclip_jax.convert.state_dict import torch_key

    torch_model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    # open_clip's main.py: exclude = p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name
    excluded = {n for n, p in torch_model.named_parameters()
                if p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))}
    mask = traverse_util.flatten_dict(decay_mask(bioclip_jax.create_model("tiny").params))
    ours = {torch_key(path) for path, decays in mask.items() if not decays}
    assert ours == excluded
    assert {"positional_embedding", "visual.proj", "text_projection", "token_embedding.weight"}.isdisjoint(ours)


def test_warmup_then_cosine_schedule():
    schedule = warmup_cosine(1e-4, warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([schedule(s) for s in (0, 4, 9)], [1e-5, 5e-5, 1e-4], rtol=1e-5)
    np.testing.assert_allclose(schedule(10), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.5e-4, rtol=1e-5)  # half way through the cosine
    np.testing.assert_allclose(schedule(110), 0.0, atol=1e-12)


@pytest.mark.integration  # trains tiny runs end to end
def test_gradient_accumulation_matches_the_full_batch(shards):
    import optax

    from bioclip_jax.data.pipeline import train_dataset
    from bioclip_jax.models import CLIP
    from bioclip_jax.train.trainer import make_train_step

    model = bioclip_jax.create_model("tiny")
    batch = next(iter(train_dataset(shards, global_batch_size=8, image_size=64, process_index=0, process_count=1)))
    batch = {k: jnp.asarray(batch[k]) for k in ("image", "tokens")}  # what to_global sends to the step
    # Plain SGD with lr 1: the parameter change is the gradient itself (Adam would amplify rounding noise).
    tx, schedule = optax.apply_if_finite(optax.sgd(1.0), 10), lambda step: 1.0
    outs = []
    for accum in (1, 2, 4):
        state = {"step": jnp.zeros((), jnp.int32), "params": model.params, "opt_state": tx.init(model.params)}
        step = jax.jit(make_train_step(CLIP(model.config), tx, schedule, "openai", accum))
        outs.append(step(state, batch))
    for new_state, metrics in outs[1:]:
        np.testing.assert_allclose(metrics["loss"], outs[0][1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], outs[0][1]["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(new_state["params"]),
                        jax.tree_util.tree_leaves(outs[0][0]["params"])):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_gradients_skip_the_update():
    params = {"w": jnp.ones((2, 2)), "logit_scale": jnp.zeros(())}
    tx, _ = make_optimizer(params, lr=0.1, warmup_steps=1, total_steps=10)
    state = tx.init(params)
    bad = {"w": jnp.full((2, 2), jnp.nan), "logit_scale": jnp.zeros(())}
    updates, state = tx.update(bad, state, params)
    assert all((u == 0).all() for u in jax.tree_util.tree_leaves(updates))
    assert int(state.total_notfinite) == 1
    good = {"w": jnp.ones((2, 2)), "logit_scale": jnp.zeros(())}
    updates, state = tx.update(good, state, params)
    assert (updates["w"] != 0).all() and int(state.total_notfinite) == 1


def test_config_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.lr_max'.*did you mean train.lr"):
        load_config(CONFIG, ["train.lr_max=1"])
    with pytest.raises(ValueError, match="config key 'train.steps'"):
        load_config(CONFIG, ["train.steps=many"])
    with pytest.raises(FileNotFoundError, match="no .array_record shards found at"):
        train(_config(tmp_path / "missing"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="must split into accum_steps=3"):
        train(_config(shards, "train.accum_steps=3"), tmp_path / "run2", progress=False)


@pytest.mark.integration  # trainers in subprocesses
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_then_exits_with_its_code(shards, tmp_path, signum, code):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "bioclip_jax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
               f"--config.data.train={shards}", "--config.train.steps=100000", "--config.checkpoint.every_steps=100000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.5)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == code, output  # distinct from 0 (finished): "stopped early, rerun to resume"
    assert f"{signal.Signals(signum).name}: saving step" in output and "rerun the same command to resume" in output
    assert "Traceback" not in output
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] >= 3 and (workdir / "checkpoints" / str(steps[-1]) / "commit_success.txt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args, devices: int, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.integration  # trainers in subprocesses
def test_multi_device_multi_process_and_resharding(shards, tmp_path):
    """8 devices (1 process) == 2 processes x 4 devices (gloo) == FSDP on 8 devices resumed on 2 devices."""
    run = str(TESTS / "train_run.py")
    _run(run, "--devices", "8", "--workdir", str(tmp_path / "eight"), "--data", str(shards), devices=8)

    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-m", "bioclip_jax.cli", "train", "--config", str(CONFIG),
                               "--workdir", str(tmp_path / "two_hosts"), f"--config.data.train={shards}",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for i in range(2)]
    for proc in procs:
        output = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, output[-3000:]

    _run(run, "--devices", "8", "--workdir", str(tmp_path / "resharded"), "--data", str(shards), "--max-steps", "3",
         "--config.train.fsdp=True", devices=8)
    _run(run, "--devices", "2", "--workdir", str(tmp_path / "resharded"), "--data", str(shards), devices=2)

    # Same data, same math; only the order of floating-point reductions differs. Adam turns near-zero gradients
    # (e.g. of the key bias, to which softmax is invariant) into +-lr steps, so params get an absolute tolerance.
    reference = _params(tmp_path / "eight")
    reference_losses = [json.loads(line)["loss"] for line in open(tmp_path / "eight" / "metrics.jsonl")]
    for other in ("two_hosts", "resharded"):
        params = _params(tmp_path / other)
        for key in reference:
            np.testing.assert_allclose(params[key], reference[key], atol=1e-4, err_msg=f"{other}: {key}")
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "two_hosts" / "metrics.jsonl")]
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)

    failed = _run(run, "--devices", "8", "--workdir", str(tmp_path / "bad"), "--data", str(shards),
                  "--config.train.global_batch_size=12", devices=8, check=False)
    assert failed.returncode != 0 and "global batch size 12 is not divisible by the 8 devices" in failed.stderr


def _two_hosts(shards, workdir, port, *overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return [subprocess.Popen([sys.executable, "-m", "bioclip_jax.cli", "train", "--config", str(CONFIG),
                              "--workdir", str(workdir), f"--config.data.train={shards}", *overrides,
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for i in range(2)]


@pytest.mark.integration  # trainers in subprocesses
def test_two_hosts_fsdp_with_evaluation_stop_together_on_sigterm_and_resume_bitwise(shards, tmp_path):
    """FSDP over 2 processes x 4 devices with periodic evaluation (params spread over hosts): SIGTERM to one host
    makes both save the same step and exit 143; rerunning finishes with the params of an uninterrupted run."""
    common = ["--config.train.fsdp=True", f"--config.data.val={shards}", "--config.eval.every_steps=2",
              "--config.train.steps=12", "--config.checkpoint.every_steps=100"]
    reference = _two_hosts(shards, tmp_path / "straight", _free_port(), *common)
    for proc in reference:
        output = proc.communicate(timeout=900)[0].decode()
        assert proc.returncode == 0, output[-3000:]

    workdir = tmp_path / "stopped"
    procs = _two_hosts(shards, workdir, _free_port(), *common)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("val/loss") < 1):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=600)[0].decode() for proc in procs]
    assert [p.returncode for p in procs] == [143, 143], outputs[0][-2000:] + outputs[1][-2000:]
    stopped_at = {int(re.search(r"SIGTERM: saving step (\d+)", out).group(1)) for out in outputs}
    assert len(stopped_at) == 1 and 2 <= stopped_at.pop() < 12  # the same step on both hosts, before the end
    evaluated = [json.loads(line) for line in metrics.read_text().splitlines() if "val/loss" in line]
    assert evaluated and all(np.isfinite(m["val/loss"]) for m in evaluated)

    for proc in _two_hosts(shards, workdir, _free_port(), *common):
        output = proc.communicate(timeout=900)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    straight, resumed = _params(tmp_path / "straight"), _params(workdir)
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
