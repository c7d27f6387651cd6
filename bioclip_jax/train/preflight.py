"""The trainer's sanity checks, run before anything compiles, and its one-line out-of-memory error.

Errors (InputError, exit 2) are for runs that would train wrongly: captions without any name (the model learns no
labels), a global batch larger than the training split (every batch repeats images, and the CLIP loss contrasts an
image with its own copies as negatives), a validation split that does not open (found only at the first evaluation
otherwise). Warnings are for runs that train correctly but lose something the user
probably wanted (a warmup the run never finishes, a validation or checkpoint interval the run never reaches): short
smoke runs (`demo --config.train.steps=3`) rely on those staying runnable. Every message names the config key and a
value that works."""

from __future__ import annotations

import contextlib
import logging
import re

import jax
import ml_collections

from bioclip_jax.convert import checkpoint
from bioclip_jax.convert import state_dict as sd
from bioclip_jax.data import pipeline
from bioclip_jax.data.records import Unreadable, decode_record
from bioclip_jax.data.taxonomy import MIXED_TEXT_TYPES, Taxon
from bioclip_jax.errors import InputError, ResourceError, first_line
from bioclip_jax.inference.model import Model, from_checkpoint
from bioclip_jax.models.config import CLIPConfig, get_model_config, list_models

log = logging.getLogger(__name__)
CAPTION_SAMPLE = 256  # records read (evenly spread over the split) to check that captions name something


def check(config: ml_collections.ConfigDict, total_steps: int, evaluates: bool = True) -> None:
    """Raises InputError for a run that would train wrongly; logs a warning for one that would lose an output.
    `evaluates`: whether the caller wired periodic evaluation (the trainer's evaluate_fn)."""
    source = pipeline.open_source(config.data.train)
    check_captions(source, config.data.train, config.data.text_type)
    check_batch(config, len(source))
    if evaluates and config.eval.every_steps > 0 and config.data.val:
        check_validation_split(config)
    for warning in interval_warnings(config, total_steps, evaluates):
        if jax.process_index() == 0:
            log.warning("%s", warning)


def check_validation_split(config: ml_collections.ConfigDict) -> None:
    """The validation shards open, now rather than at the first evaluation (after compiling and eval.every_steps
    steps: a recipe's default data.val that does not exist here used to fail only then)."""
    try:
        pipeline.open_source(config.data.val)
    except (FileNotFoundError, InputError) as e:
        raise InputError(f"data.val={config.data.val!r} (validated every eval.every_steps={config.eval.every_steps} "
                         f"steps): {e}; pass --config.data.val=PATH, or --config.data.val= for no validation") from None


def _text_types(text_type: str) -> tuple[str, ...]:
    return MIXED_TEXT_TYPES if text_type in pipeline.PER_STEP_TEXT_TYPES + ("mixed_per_sample",) else (text_type,)


def _names_something(taxon: Taxon, text_type: str) -> bool:
    """Whether the caption of this type holds any of the taxon's names ("sci_com" of an empty taxon is " with common
    name ": no name)."""
    return bool(taxon.name(text_type).replace("with common name", "").strip())


def check_captions(source, where, text_type: str, sample: int = CAPTION_SAMPLE) -> None:
    """Captions are built from each record's ranks and common name; a record without them trains on "a photo of ."
    under every text type the run uses. Refused when no record read has a name (a warning when only some lack one)."""
    n = len(source)
    if n == 0 or text_type == "text":
        return  # the pipeline names an empty split; "text" captions are the records' own (image-text pairs)
    types = _text_types(text_type)
    read, nameless, labels = 0, 0, []
    for index in sorted({i * n // min(n, sample) for i in range(min(n, sample))}):
        element = source[index]
        if isinstance(element, Unreadable):
            continue  # counted and replaced by the pipeline
        try:
            record = decode_record(element, f"{where} record {index}") if isinstance(element, bytes) else element
        except InputError:
            continue  # a damaged record: the pipeline counts and replaces it (data.max_skipped_fraction)
        read += 1
        taxon = Taxon.from_ranks(record["ranks"], record.get("common", ""))
        if all(not _names_something(taxon, t) for t in types):
            nameless += 1
            if record.get("label") and record["label"] not in labels:
                labels.append(record["label"])
    if read and nameless == read:
        label_hint = (f"; the records' class labels ({', '.join(repr(x) for x in labels[:3])}) are not captions"
                      if labels else "")
        raise InputError(
            f"data.train {where}: none of the {read} records read has a taxonomy (kingdom..species and common_name "
            f"are all empty), so every caption would be 'a photo of .' and training would learn no labels"
            f"{label_hint}: make the shards from a CSV with kingdom..species columns (or common_name)")
    if nameless:
        log.warning("data.train %s: %d of %d records read have no name of text type %s: they train on 'a photo "
                    "of .'", where, nameless, read, "/".join(types))


def working_batch(images: int, config: ml_collections.ConfigDict) -> int:
    """The largest global batch at most `images` that splits over the devices and accumulation steps (a power of two
    where one fits): 0 when even one example per device and micro-batch is more than the split."""
    unit = jax.device_count() * config.train.accum_steps
    power = 1 << (images.bit_length() - 1) if images else 0
    if power and power % unit == 0:
        return power
    return images // unit * unit


def check_batch(config: ml_collections.ConfigDict, images: int) -> None:
    t = config.train
    if images == 0 or t.global_batch_size <= images:
        return
    batch = working_batch(images, config)
    fix = (f"set --config.train.global_batch_size={batch} (at most the split's size)" if batch else
           f"add images: the split is smaller than {jax.device_count()} device(s) x train.accum_steps={t.accum_steps}")
    raise InputError(
        f"train.global_batch_size={t.global_batch_size} is larger than the training split ({images} images in "
        f"{config.data.train}): every batch would hold the same images several times, and the CLIP loss would "
        f"contrast each with its own copies as negatives; {fix}")


def interval_warnings(config: ml_collections.ConfigDict, total_steps: int, evaluates: bool = True) -> list[str]:
    """What the run would silently never do: finish warmup, validate, save a checkpoint before its last step."""
    t, warnings = config.train, []
    some = max(1, total_steps // 4)
    if t.warmup_steps >= total_steps > 0:
        warnings.append(
            f"train.warmup_steps={t.warmup_steps} is at or beyond the run's {total_steps} steps: the learning rate "
            f"rises to {t.lr * total_steps / max(t.warmup_steps, 1):.3g} at most (train.lr={t.lr:g}) and never "
            f"decays; --config.train.warmup_steps={max(1, total_steps // 10)} warms up over a tenth of the run")
    if evaluates and config.eval.every_steps > total_steps:
        warnings.append(
            f"eval.every_steps={config.eval.every_steps} is beyond the run's {total_steps} steps: no validation "
            f"would run during training; --config.eval.every_steps={some} validates {total_steps // some} times")
    if config.checkpoint.every_steps > total_steps:
        warnings.append(
            f"checkpoint.every_steps={config.checkpoint.every_steps} is beyond the run's {total_steps} steps: only "
            f"the last step is saved (a crash before it loses the run); --config.checkpoint.every_steps={some} "
            f"saves every {some} steps")
    return warnings


# ------------------------------------------------------------------------------------------------ init weights
def _architecture_name(model_config: CLIPConfig) -> str | None:
    """The known open_clip name of an architecture (as config.model takes it), if it has one."""
    target = model_config.to_open_clip()
    if model_config.name in list_models() and get_model_config(model_config.name).to_open_clip() == target:
        return model_config.name
    return next((name for name in list_models() if get_model_config(name).to_open_clip() == target), None)


def load_init(config: ml_collections.ConfigDict, model_config: CLIPConfig) -> Model:
    """config.init, checked against config.model. config.init_model names the architecture of a bare weights file
    (GELU and QuickGELU weights have the same tensors; default: config.model); weights that carry their own config (a
    model folder, a training run, a hub model) are read with it, so a recipe's init_model never conflicts with them.
    A conflict names the key to change and a value that works."""
    ckpt = checkpoint.read(config.init)
    if ckpt.model_cfg is not None:
        loaded = from_checkpoint(ckpt)
        if loaded.config.to_open_clip() != model_config.to_open_clip():
            name = _architecture_name(loaded.config)
            fix = f"--config.model={name}" if name else "--config.model=PATH (an open_clip model JSON of theirs)"
            raise InputError(f"init weights {config.init} are a {name or 'different'} model (their own config), but "
                             f"config.model is {config.model!r}: fine-tune their architecture with {fix}")
        return loaded
    arch = config.init_model or config.model
    try:
        loaded = from_checkpoint(ckpt, arch)
    except sd.StateDictMismatch as e:
        fits = sd.fitting_architectures(ckpt.state_dict) if ckpt.state_dict is not None else []
        if not fits:
            raise InputError(f"{e} (read as config.init_model={arch!r}: the architecture of a weights file without "
                             f"a config)") from None
        raise InputError(f"init weights {config.init} (a weights file without a config) do not fit "
                         f"config.init_model={arch!r}; they fit {', '.join(fits)}: --config.init_model={fits[0]} "
                         f"--config.model={fits[0]}") from None
    if loaded.config.to_open_clip() != model_config.to_open_clip():
        same_tensors = sd.param_shapes(loaded.config) == sd.param_shapes(model_config)
        fix = (f"--config.init_model={config.model} if the file holds {config.model} weights, or " if same_tensors
               else "") + f"--config.model={arch} to fine-tune its architecture"
        raise InputError(f"init weights {config.init} (a weights file without a config) are read as "
                         f"config.init_model={arch!r}, but config.model is {config.model!r}: {fix}")
    return loaded


# ------------------------------------------------------------------------------------------------ device memory
def is_out_of_memory(error: BaseException | None) -> bool:
    """XLA's RESOURCE_EXHAUSTED (at compile, or at run time where it may surface only when a result is read), here
    or in the exceptions it was raised from."""
    while error is not None:
        message = str(error)
        if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def memory_advice(config: ml_collections.ConfigDict, error: BaseException) -> str:
    """One line: what ran out, the run's memory settings, and the overrides that need less, those not yet on first."""
    t = config.train
    devices = jax.device_count()
    per_device = t.global_batch_size // max(devices, 1)
    fixes = []
    if config.remat != "full":
        fixes.append("--config.remat=full" if config.remat else "--config.remat=dots (or full: recompute activations)")
    if config.dtype == "float32":
        fixes.append("--config.dtype=bfloat16")
    if per_device // t.accum_steps >= 2:
        fixes.append(f"--config.train.accum_steps={t.accum_steps * 2} (same global batch, smaller micro-batches)")
    if not t.fsdp and devices > 1:
        fixes.append("--config.train.fsdp=True (shards params and optimizer state)")
    fixes.append(f"--config.train.global_batch_size={max(devices, t.global_batch_size // 2)}")
    detail = re.sub(r"(\d{7,}) bytes", lambda m: f"{int(m.group(1)) / 2**30:.1f} GiB",
                    first_line(error).split(":", 1)[-1].strip())
    return (f"out of device memory ({detail[:120]}) with {per_device} images per device (global batch "
            f"{t.global_batch_size} over {devices} device(s), accum_steps {t.accum_steps}), model {config.model}, "
            f"dtype {config.dtype}, remat {config.remat or 'off'}, fsdp {t.fsdp}. Try, in this order: "
            f"{'; '.join(fixes)}. `bioclip-jax plan` checks a config's memory without a run")


@contextlib.contextmanager
def memory_errors(config: ml_collections.ConfigDict):
    """Any out-of-device-memory error in the block (compile, init, a step, or reading a step's results: JAX runs
    steps asynchronously, so the step's own call may return before the allocation fails) -> one ResourceError."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are translated; anything else re-raises as is
        if not is_out_of_memory(e):
            raise
        raise ResourceError(memory_advice(config, e)) from e


def raise_with_memory_advice(error: Exception, config: ml_collections.ConfigDict) -> None:
    """The training step's error re-raised: as one ResourceError if it is out of memory, else unchanged."""
    if not is_out_of_memory(error):
        raise error
    raise ResourceError(memory_advice(config, error)) from error

