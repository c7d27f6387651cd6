"""The training loop, top to bottom: mesh -> state (initialised or restored, already sharded) -> data -> jitted step
-> metrics, checkpoints, evaluation. Rerunning the same command on the same workdir resumes exactly."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from tqdm.auto import tqdm

from bioclip_jax import mesh as mesh_lib
from bioclip_jax import paths
from bioclip_jax.convert import run_dir
from bioclip_jax.convert.checkpoint import host_params
from bioclip_jax.convert.files import load_model_config
from bioclip_jax.data import pipeline
from bioclip_jax.data.taxonomy import text_type_for_step
from bioclip_jax.data.transforms import NORMALIZATION, Preprocess
from bioclip_jax.errors import InputError, ResourceError
from bioclip_jax.inference.encoder import MeshEncoder
from bioclip_jax.inference.model import Model
from bioclip_jax.models.clip import CLIP, add_continual_proj, init_params, without_continual_proj
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.loss import clip_loss, continual_clip_loss
from bioclip_jax.models.scan import stack_layers, unstack_layers
from bioclip_jax.train import metrics as metrics_lib
from bioclip_jax.train import preflight
from bioclip_jax.train import workdir as workdir_lib
from bioclip_jax.train.device_batch import interleave_replay, normalize_images, to_global
from bioclip_jax.train.lora import add_lora, merge_lora
from bioclip_jax.train.optimizer import clamp_logit_scale, make_optimizer, skipped_updates, trainable_mask
from bioclip_jax.train.skipped_records import SkippedRecords
from bioclip_jax.train.stopping import StopSignals

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class TrainResult:
    step: int
    params: Any
    model_config: CLIPConfig
    preprocess: Preprocess
    history: list[dict]
    workdir: epath.Path
    stopped_by: str | None = None  # "SIGTERM" or "SIGINT" when a signal stopped the run early (it saved first)

    def model(self, attn_implementation: str = "xla") -> Model:
        # LoRA merged into plain weights; the replay head is not exported
        params = without_continual_proj(unstack_layers(merge_lora(host_params(self.params))))
        return Model(self.model_config, params, self.preprocess, attn_implementation=attn_implementation,
                     source="trained")


def make_train_step(module: CLIP, tx, schedule, normalization: str, accum_steps: int = 1, replicated=None,
                    grad_sharding=None, replay: tuple[int, int] | None = None, trainable=None,
                    distinct_captions: bool = False):
    """(state, batch) -> (state, metrics). With accum_steps > 1 the global batch is processed in micro-batches with
    open_clip's feature cache: features of all micro-batches are computed without gradients, then each micro-batch
    is recomputed with gradients against the cached rest, so the loss still contrasts the whole global batch and the
    summed gradient equals the full-batch gradient (logit_scale's gradient taken once). On a mesh, `replicated` (a
    replicated sharding) makes the loss gather the text features once (models/loss.py) and FSDP gather the params
    for the forward (left to itself, XLA split the batch's activations along the sharded param dimensions instead:
    all-to-alls and gathers of activations), and `grad_sharding` (the params' shardings) puts each gradient where
    its param lives: FSDP reduce-scatters gradients. A module with `gather_layer_params` gathers its scanned blocks
    itself, one layer at a time inside the loop (gathered here, before the loop, every layer would be held at once).
    `replay` = (shards, replay rows per shard): the batch holds BioCLIP 2's replay rows in that layout
    (`device_batch.interleave_replay`) and the loss is its two-head objective (`continual_clip_loss`; the module's
    `continual_proj` head if it has one, else `proj`), with "contrastive_loss" and "continual_loss" in the metrics.
    `trainable` (optimizer.trainable_mask): frozen params pass through stop_gradient, so no gradient is computed for
    them; LoRA pairs (train/lora.py) are merged into their kernels before every forward pass. `distinct_captions`
    (train.distinct_captions): rows with the same caption are no negatives of each other (models/loss.py)."""
    encode = _make_encode(module, normalization, replicated, trainable)

    def loss_of(image, continual, text, scale, tokens, micro_batches: int = 1):
        if replay is None:
            return clip_loss(image, text, scale, replicated, tokens), {}
        # Each (micro-batch, device) block holds its main rows, then its replay rows (_micro_batches).
        shards, rows = replay
        return continual_clip_loss(image, continual, text, scale, shards * micro_batches, rows // micro_batches,
                                   replicated, tokens)

    def loss_and_grads(params, batch):
        if accum_steps == 1:
            def loss_fn(p):
                image, text, scale, *continual = encode(p, batch["image"], batch["tokens"])
                return loss_of(image, (continual or [image])[0], text, scale,
                               batch["tokens"] if distinct_captions else None)
            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        micro = _micro_batches(batch, accum_steps, replay)
        cached = jax.lax.map(lambda mb: encode(params, mb["image"], mb["tokens"]), micro)
        # The rows in the order of the cache's [micro-batch, row] reshape below.
        all_tokens = micro["tokens"].reshape(-1, micro["tokens"].shape[-1]) if distinct_captions else None
        # The replay head's features are cached too (a one-head model: proj's again).
        cached_image, cached_text, cached_continual = jax.lax.stop_gradient(
            (cached[0], cached[1], cached[3] if len(cached) > 3 else cached[0]))

        def micro_grads(grads, k):
            def loss_fn(p):
                mb = jax.tree_util.tree_map(lambda x: x[k], micro)
                image, text, scale, *continual = encode(p, mb["image"], mb["tokens"])
                scale = jnp.where(k == 0, scale, jax.lax.stop_gradient(scale))

                def whole(cache, features):
                    return cache.at[k].set(features).reshape(-1, features.shape[-1])
                return loss_of(whole(cached_image, image), whole(cached_continual, (continual or [image])[0]),
                               whole(cached_text, text), scale, all_tokens, accum_steps)
            (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return jax.tree_util.tree_map(jnp.add, grads, g), (loss, parts)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        grads, (losses, parts) = jax.lax.scan(micro_grads, zeros, jnp.arange(accum_steps))
        return (losses[0], jax.tree_util.tree_map(lambda x: x[0], parts)), grads

    def train_step(state, batch):
        (loss, loss_parts), grads = loss_and_grads(state["params"], batch)
        if grad_sharding is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = clamp_logit_scale(optax.apply_updates(state["params"], updates))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                        "logit_scale": jnp.exp(params["logit_scale"]), "skipped_updates": skipped_updates(opt_state),
                        **loss_parts}
        return new_state, step_metrics

    return train_step


def _make_encode(module: CLIP, normalization: str, replicated, trainable):
    """(params, uint8 images, tokens) -> the module's outputs, as the step runs it: frozen params behind
    stop_gradient, LoRA pairs merged, FSDP params gathered where used (scanned blocks by the module, per layer)."""
    gather_layers = module.gather_layer_params is not None

    def encode(params, images, tokens):
        if trainable is not None:
            params = jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
        params = merge_lora(params)
        if replicated is not None:  # FSDP: gather each param where it is used, keep activations batch-sharded
            params = mesh_lib.gather_params(params, replicated.mesh, gather_layers)
        images = normalize_images(images, normalization, module.dtype)
        return module.apply({"params": params}, images, tokens)
    return encode


def _micro_batches(batch: dict, accum_steps: int, replay: tuple[int, int] | None) -> dict:
    """The global batch as [accum_steps, rows / accum_steps, ...]. With replay, micro-batch k takes the k-th share of
    every device's main rows and of its replay rows, so each micro-batch keeps `split_replay_rows`' layout (per
    device: main rows, then replay rows) and its rows stay on the devices that hold them."""
    if replay is None:
        return jax.tree_util.tree_map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
    shards, rows = replay

    def split(x):
        blocks = x.reshape(shards, -1, *x.shape[1:])
        parts = [part.reshape(shards, accum_steps, -1, *x.shape[1:]) for part in (blocks[:, :-rows], blocks[:, -rows:])]
        return jnp.concatenate(parts, axis=2).swapaxes(0, 1).reshape(accum_steps, -1, *x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


@dataclasses.dataclass
class TrainStep:
    """The jitted step and what it runs on; `train` runs it and the planner (train/plan.py) compiles the same."""
    module: CLIP
    tx: Any
    schedule: Any
    init_state: Any  # () -> state; jit it with out_shardings=state_sharding
    abstract_state: Any
    state_sharding: Any
    batch_sharding: Any
    step: Any  # jitted (state, batch) -> (state, metrics); the state is donated


def build_train_step(config: ml_collections.ConfigDict, model_config: CLIPConfig, mesh, make_params,
                     total_steps: int | None = None) -> TrainStep:
    """Module, optimizer, abstract state, shardings and the jitted step for `config` on `mesh`; `make_params()`
    returns the initial params (only traced here, through eval_shape). `total_steps` sets the schedule's length
    (default: train.steps)."""
    t = config.train
    devices = mesh.devices.size
    replay = _replay_layout(config, mesh)
    if t.global_batch_size % devices:
        raise InputError(f"global batch size {t.global_batch_size} is not divisible by the {devices} devices; "
                         f"use a multiple of {devices}")
    if t.global_batch_size % (devices * t.accum_steps):
        raise InputError(f"global batch size {t.global_batch_size} must split into accum_steps={t.accum_steps} "
                         f"micro-batches that divide over {devices} devices")
    gather_layers = t.fsdp and config.scan_layers  # FSDP gathers scanned blocks layer by layer, inside the loop
    module = CLIP(model_config, dtype=DTYPES[config.dtype], attn_implementation=config.attn_implementation or None,
                  remat=config.remat or None, scan_layers=config.scan_layers,
                  gather_layer_params=mesh_lib.layer_gather(mesh) if gather_layers else None, mesh=mesh,
                  continual_proj=_continual_head(config))
    if _continual_head(config):  # e.g. the planner's random-init shapes: add the head where they lack it
        make_params = _with_continual_proj(make_params)
    if t.trainable == "lora":  # here, so that the trainer and the planner (train/plan.py) both get the pairs
        make_params = _with_lora(make_params, t.lora_rank, t.seed)
    abstract_params = jax.eval_shape(make_params)
    trainable = trainable_mask(abstract_params, t.trainable)
    tx, schedule = make_optimizer(abstract_params, lr=t.lr, warmup_steps=t.warmup_steps,
                                  total_steps=total_steps or t.steps, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
                                  eps=t.eps, grad_clip_norm=t.grad_clip_norm or None, trainable=trainable)

    def init_state():
        params = make_params()
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract_state = jax.eval_shape(init_state)
    state_sharding = mesh_lib.tree_shardings(abstract_state, mesh, fsdp=t.fsdp)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step = jax.jit(make_train_step(module, tx, schedule, config.data.normalization, t.accum_steps,
                                   replicated=mesh_lib.replicated(mesh), grad_sharding=state_sharding["params"],
                                   replay=replay, trainable=trainable, distinct_captions=t.distinct_captions),
                   in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                   donate_argnums=(0,))
    return TrainStep(module, tx, schedule, init_state, abstract_state, state_sharding, batch_sharding, step)


def device_batch_size(config: ml_collections.ConfigDict) -> int:
    """Rows of the global batch the devices see: train.global_batch_size, plus replay.per_batch replay rows."""
    return config.train.global_batch_size + max(config.replay.per_batch, 0)


def _continual_head(config) -> bool:
    return config.replay.per_batch > 0 and config.replay.continual_proj


def _with_continual_proj(make_params):
    return lambda: add_continual_proj(make_params())


def _replay_layout(config, mesh) -> tuple[int, int] | None:
    """(batch shards, replay rows per shard) for the loss, or None without replay. Every device holds the same
    number of main and of replay rows (`interleave_replay`), so the split needs no communication."""
    rows, t = config.replay.per_batch, config.train
    if rows < 0:
        raise InputError(f"replay.per_batch={rows}: expected 0 (no replay) or a positive number of rows")
    if not rows:
        return None
    shards = mesh.shape["data"]  # mesh.batch_sharding: the batch split along the data axis
    if rows % shards or t.global_batch_size % shards:
        raise InputError(f"replay.per_batch={rows} and train.global_batch_size={t.global_batch_size} must both be "
                         f"multiples of the {shards} devices along the batch (each holds the same number of replay "
                         f"rows); e.g. replay.per_batch={max(shards, rows // shards * shards)}")
    main = t.global_batch_size // shards
    if (rows // shards) % t.accum_steps or main % t.accum_steps:
        raise InputError(f"train.accum_steps={t.accum_steps} with replay: each device's {main} main and "
                         f"{rows // shards} replay rows must split into {t.accum_steps} equal micro-batches")
    return shards, rows // shards


def _with_lora(make_params, rank: int, seed: int):
    return lambda: add_lora(make_params(), rank, seed)


def _initial_params(config: ml_collections.ConfigDict, model_config: CLIPConfig, seed: int):
    continual = _continual_head(config)
    if config.init and config.init != "scratch":
        loaded = preflight.load_init(config, model_config)  # init_model applies to bare weights files only
        # BioCLIP 2 starts continual_proj as a copy of the pretrained proj (its fork's load_checkpoint).
        params = add_continual_proj(loaded.params) if continual else loaded.params
        return lambda: stack_layers(params) if config.scan_layers else params
    return lambda: init_params(model_config, seed, scan_layers=config.scan_layers, continual_proj=continual)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, max_steps: int | None = None,
          progress: bool = True, evaluate_fn=None) -> TrainResult:
    """Trains (or resumes) `config` in `workdir` (a local folder or an epath URL such as gs://bucket/run). `max_steps`
    stops early (still saving), e.g. for tests. Every config.eval.every_steps, `evaluate_fn(encoder, step) -> dict of
    scalars` is logged: the encoder runs on the training mesh (inference/encoder.py's MeshEncoder); the caller wires
    the evaluation, e.g. `bioclip_jax.evaluate.zero_shot.validation_evaluator`."""
    workdir = paths.resolve(workdir)
    paths.make_dirs(workdir)
    with workdir_lib.WorkdirLock(workdir), preflight.memory_errors(config):  # every path out of memory: one line
        return _train(config, workdir, max_steps, progress, evaluate_fn)


def _train(config, workdir, max_steps, progress, evaluate_fn) -> TrainResult:
    t = config.train

    # ---- model and mesh
    model_config, preprocess = _model(config)
    total_steps = _total_steps(config)
    preflight.check(config, total_steps, evaluates=evaluate_fn is not None)  # before anything compiles
    mesh = mesh_lib.make_mesh()

    # ---- state: created already sharded (eval_shape first, nothing allocated twice)
    parts = build_train_step(config, model_config, mesh, _initial_params(config, model_config, t.seed), total_steps)
    # The run this command continues, checked before anything is written (another model or optimizer structure
    # would make its checkpoints unusable).
    signature = workdir_lib.state_signature(parts.abstract_state)
    workdir = workdir_lib.choose(workdir, model_config.to_open_clip(), signature, t.allow_restart)

    # ---- data
    data_iter = _data_iterator(config, model_config)
    replay_shards = mesh.shape["data"] // jax.process_count()  # this process's blocks of the replay layout

    with run_dir.Checkpoints(workdir, config.checkpoint.keep, config.checkpoint.every_steps,
                             config.checkpoint.async_save) as checkpoints:
        # ---- restore or initialise
        step, state = _restore_or_init(checkpoints, parts, data_iter)
        if jax.process_index() == 0:  # only now: the config, the data and the checkpoints have all been checked
            _write_run_file(config, workdir, model_config, preprocess, signature)
            workdir_lib.truncate_metrics(workdir, step)

        # ---- the loop
        writer = metrics_lib.MetricWriter(workdir)
        history: list[dict] = []
        last_step = total_steps if max_steps is None else min(total_steps, max_steps)
        eval_encoder = None
        bar = tqdm(total=total_steps, initial=step, desc="train", disable=not progress or jax.process_index() != 0)
        window = _Throughput(model_config, device_batch_size(config), mesh.devices.size)
        skipped = SkippedRecords(config.data.max_skipped_fraction, t.global_batch_size)
        with StopSignals() as stop, bar:  # the bar closes on every way out, an error's too
            while step < last_step:
                fetch_start = time.perf_counter()
                host_batch = next(data_iter)
                skipped.add(host_batch)  # records replaced because they could not be read (data/skipped_records)
                if "replay_rows" in host_batch:
                    host_batch = interleave_replay(host_batch, replay_shards)
                batch = to_global(host_batch, parts.batch_sharding)
                window.data_wait += time.perf_counter() - fetch_start
                try:
                    state, step_metrics = parts.step(state, batch)
                except Exception as e:  # noqa: BLE001 - XLA reports OOM as a runtime error; anything else re-raises
                    _raise_with_memory_advice(e, config)
                step += 1
                window.steps += 1
                if step % config.log_every_steps == 0 or step == last_step:
                    logged = _log_line(step, step_metrics, window, skipped, config.data.text_type)
                    if "replay_passes" in host_batch:  # a replay source that ran dry started a new pass
                        logged["data/replay_passes"] = float(host_batch["replay_passes"])
                    writer.write(step, {k: v for k, v in logged.items() if k != "text_type"})
                    history.append({"step": step, **logged})
                    bar.set_postfix(loss=f"{logged['loss']:.3f}", img_s=f"{logged['images_per_second']:.0f}")
                bar.update(1)
                _save(checkpoints, step, state, data_iter)
                if evaluate_fn is not None and config.eval.every_steps and step % config.eval.every_steps == 0:
                    eval_encoder = _eval_encoder(eval_encoder, model_config, state, preprocess, mesh)
                    writer.write(step, evaluate_fn(eval_encoder, step))
                if stop.should_stop(checkpoints, step):
                    log.warning("%s: saving step %d and stopping (rerun the same command to resume)", stop.received,
                                step)
                    break
        _save(checkpoints, step, state, data_iter, force=checkpoints.latest_step() != step, wait=True)
    writer.close()
    return TrainResult(step, state["params"], model_config, preprocess, history, workdir, stop.received)


def _data_iterator(config, model_config: CLIPConfig):
    """The training batches: the main stream, with replay.per_batch replay rows appended to each host batch when
    replay is on (`pipeline.MixedDataset`: both streams' states go into every checkpoint)."""
    t, d = config.train, config.data
    options = dict(image_size=model_config.vision.image_size, seed=t.seed, scale=tuple(d.crop_scale),
                   context_length=model_config.text.context_length, worker_count=d.workers,
                   prefetch_batches=d.prefetch_batches)
    main = pipeline.train_dataset(d.train, global_batch_size=t.global_batch_size, text_type=d.text_type, **options)
    if config.replay.per_batch <= 0:
        return iter(main)
    if not config.replay.data:
        raise InputError(f"replay.per_batch={config.replay.per_batch} needs replay.data: the replay "
                         "image-text pairs, shards, tars or Parquet (--config.replay.data=PATH), or replay.per_batch=0 "
                         "for no replay")
    replay = pipeline.replay_dataset(config.replay.data, rows_per_batch=config.replay.per_batch,
                                     text_type=config.replay.text_type, image_column=config.replay.image_column,
                                     caption_column=config.replay.caption_column, **options)
    return iter(pipeline.MixedDataset(main, replay))


def _model(config) -> tuple[CLIPConfig, Preprocess]:
    """The architecture, and the preprocessing that evaluation and the exported model use (eval.normalization;
    BioCLIP: OpenAI's), which may differ from training's data.normalization."""
    if config.require_init and not config.init:
        raise InputError("this recipe fine-tunes pretrained weights (BioCLIP starts from OpenAI's CLIP): pass "
                         "--config.init=PATH (weights of config.model), or --config.init=scratch to train from random "
                         "weights")
    model_config = load_model_config(config.model)
    mean, std = NORMALIZATION[config.eval.normalization or config.data.normalization]
    return model_config, Preprocess(size=model_config.vision.image_size, mean=mean, std=std)


def _restore_or_init(checkpoints: run_dir.Checkpoints, parts: TrainStep, data_iter) -> tuple[int, Any]:
    """(step, state): the newest readable checkpoint resharded onto this mesh (the iterator restored with it), or a
    fresh state at step 0."""
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      parts.abstract_state, parts.state_sharding)
    step, state = checkpoints.restore(abstract, data_iter)
    if state is None:
        return 0, jax.jit(parts.init_state, out_shardings=parts.state_sharding)()
    log.info("resumed from step %d in %s", step, checkpoints.directory.parent)
    return step, state


def _write_run_file(config, workdir: epath.Path, model_config: CLIPConfig, preprocess: Preprocess,
                    signature: dict) -> None:
    mean, std = NORMALIZATION[config.data.normalization]
    run_dir.write_run_file(workdir, model_config.to_open_clip(), preprocess.to_open_clip(),
                           json.loads(config.to_json()), signature,
                           {"name": config.data.normalization, "mean": list(mean), "std": list(std)})


class _Throughput:
    """Steps, and time spent waiting for data, since the last log line; `read` turns them into rates and restarts."""

    def __init__(self, model_config: CLIPConfig, global_batch_size: int, devices: int):
        self.batch, self.devices = global_batch_size, devices
        self.flops_per_step = metrics_lib.train_flops_per_pair(model_config) * global_batch_size
        self.peak = metrics_lib.peak_flops_per_device()
        self._restart()

    def _restart(self) -> None:
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    def read(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        tflops = self.steps * self.flops_per_step / elapsed / self.devices / 1e12
        rates = {"images_per_second": self.steps * self.batch / elapsed, "tflops_per_device": tflops,
                 "data_wait_fraction": self.data_wait / elapsed, "mfu": tflops * 1e12 / self.peak if self.peak else 0.0}
        self._restart()
        return rates


def _log_line(step: int, step_metrics, window: _Throughput, skipped: SkippedRecords, text_type: str) -> dict:
    """The step's metrics and the window's rates; fetching the metrics is the only host sync, once per log line."""
    logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    logged.update(window.read())
    logged["data/skipped_records"] = skipped.check()  # since this run (re)started; raises if too many
    if text_type in pipeline.PER_STEP_TEXT_TYPES:
        logged["text_type"] = text_type_for_step(step - 1)  # the caption type of this step's batch
    return logged


def _total_steps(config) -> int:
    """train.steps, or with train.epochs > 0 the steps of that many passes over the training split."""
    t = config.train
    if t.epochs <= 0:
        if t.steps <= 0:
            raise InputError(f"train.steps={t.steps}: expected a positive number of steps, or train.epochs > 0")
        return t.steps
    images = len(pipeline.open_source(config.data.train))
    steps = max(1, int(t.epochs * images // t.global_batch_size))
    log.info("training split: %d images; %g epochs at global batch %d = %d steps", images, t.epochs,
             t.global_batch_size, steps)
    return steps


def _save(checkpoints: run_dir.Checkpoints, step: int, state, data_iter, force: bool = False,
          wait: bool = False) -> None:
    """A checkpoint save; a full disk (now, or in the async write of an earlier save) is one clear error that leaves
    the earlier checkpoints as they were (Orbax finalizes a step only when all of it is written)."""
    try:
        checkpoints.save(step, state, data_iter, force=force)
        if wait:
            checkpoints.wait()
    except Exception as e:  # noqa: BLE001 - async failures arrive wrapped; only a full disk is translated
        if not _is_disk_full(e):
            raise
        raise ResourceError(f"no space left on device while saving step {step} to {checkpoints.directory}; the "
                            "earlier checkpoints are intact: free space and rerun the same command to resume") from e


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _raise_with_memory_advice(error: Exception, config) -> None:
    preflight.raise_with_memory_advice(error, config)


def _eval_encoder(encoder: MeshEncoder | None, model_config: CLIPConfig, state, preprocess: Preprocess,
                  mesh) -> MeshEncoder:
    """The evaluators' encoder: the train state's params where they are (sharded over the mesh, stacked or per
    layer), no host copy, every chip encoding; one encoder reused across evaluations (it compiles once)."""
    # Evaluation uses `proj` (as export does) and LoRA merged into the kernels (as the exported model).
    params = merge_lora(without_continual_proj(state["params"]))
    if encoder is None:
        encoder = MeshEncoder(model_config, params, preprocess, mesh)
    encoder.params = params
    return encoder
