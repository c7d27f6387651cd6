"""Config files (ml_collections, `get_config()` in a .py file) and command-line overrides `--config.a.b=value`."""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import importlib.util
import os

import ml_collections

from bioclip_jax.errors import InputError

# The recipes ship inside the package; they are read as files (like a config given by path), not imported as modules,
# so this lower layer never imports the configs layer above it.
_RECIPES = importlib.resources.files("bioclip_jax") / "configs"


def config_names() -> list[str]:
    """The recipes shipped with the package (bioclip_jax/configs/*.py), by name."""
    return sorted(p.name[:-3] for p in _RECIPES.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))


def load_config(name_or_path: str | os.PathLike, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """A recipe by name (`demo`, `bioclip_vitb16`: the files in bioclip_jax/configs, usable from any directory) or a
    config file by path, with `key=value` overrides applied, then locked (unknown keys are errors from here on)."""
    path = os.fspath(name_or_path)
    if not os.path.exists(path):  # a recipe: "demo", "demo.py" or "configs/demo.py" from another directory
        recipe = _RECIPES / f"{os.path.basename(path).removesuffix('.py')}.py"
        if os.path.dirname(path) not in ("", "configs") or not recipe.is_file():
            raise InputError(f"config {path!r}: no such file, and not a recipe name (recipes: "
                             f"{', '.join(config_names())})")
        path = str(recipe)
    spec = importlib.util.spec_from_file_location("bioclip_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InputError(f"{path}: a config file must define get_config()")
    config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    config.lock()
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """"train.lr=3e-4" (the `--config.` prefix already removed). Unknown keys are errors naming close matches;
    values are parsed as Python literals where they parse, else taken as strings."""
    if "=" not in override:
        raise InputError(f"config override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            close = _suggestions(config, parts, i)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"unknown config key {key!r} ({part!r} is not in {where}){hint}")
        if i < len(parts) - 1:
            node = node[part]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
        raise InputError(f"config key {key!r} is a group ({', '.join(old.keys())}): override one of its keys, "
                         f"e.g. --config.{key}.{next(iter(old.keys()))}=VALUE")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[parts[-1]] = value
    except TypeError:  # ml_collections keeps a field's type; its message names its own internals
        expected = _TYPE_NAMES.get(type(old), f"a {type(old).__name__}")
        raise InputError(f"config key {key!r} expects {expected} (now {old!r}), not {raw!r}") from None


_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple such as (0.9, 1.0)"}


def _initials(name: str) -> str:
    """learning_rate -> lr: the abbreviation configs use (train.lr); empty for a one-word name."""
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else ""


def _close(name: str, options, cutoff: float, substrings: bool) -> list[str]:
    close = difflib.get_close_matches(name, options, n=3, cutoff=cutoff)
    return close + [o for o in options if o not in close and (
        name in (_initials(o), o) or o == _initials(name) or substrings and (o in name or name in o))]


def _suggestions(config: ml_collections.ConfigDict, parts: list[str], i: int) -> list[str]:
    """Keys close to the one asked for: siblings of the unknown part (train.learning_rate -> train.lr), then keys
    anywhere whose last part is close to the asked key's last part (lr -> train.lr, trian.steps -> train.steps)."""
    node = config
    for part in parts[:i]:
        node = node[part]
    options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    found = [".".join(parts[:i] + [c]) for c in _close(parts[i], options, 0.5, substrings=True)]
    leaves = _leaf_keys(config)
    lasts = sorted({k.rsplit(".", 1)[-1] for k in leaves})
    exact = [k for k in leaves if k.rsplit(".", 1)[-1] == parts[-1] and k not in found]
    if exact:  # lr -> train.lr, not also the keys whose initials are "lr" (train.lora_rank)
        return (found + exact)[:5]
    for last in _close(parts[-1], lasts, 0.8, substrings=False):
        found += [k for k in leaves if k.rsplit(".", 1)[-1] == last and k not in found]
    return found[:5]


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config file: each starts from these and changes what it needs."""
    c = ml_collections.ConfigDict()
    c.model = "ViT-B-16-quickgelu"  # open_clip name, or a path to an open_clip model JSON
    c.dtype = "float32"  # compute dtype: "bfloat16" on accelerators; params stay float32
    c.attn_implementation = "xla"  # "splash": TPU flash attention (XLA's path elsewhere); "cudnn": GPU flash (bf16)
    c.remat = ""  # "", "full", "dots" or "dots_all" (layers.REMAT_POLICIES)
    c.scan_layers = False  # nn.scan over each tower's blocks: one compiled block, params stacked per tower
    c.init = ""  # weights to start from (any bioclip_jax.load source); "" or "scratch": random initialisation
    c.require_init = False  # True in fine-tuning recipes: starting from random weights needs init="scratch"
    # Architecture of a bare init file (weights without a config; GELU and QuickGELU weights have the same tensors),
    # e.g. "ViT-B-16-quickgelu"; "" = config.model. Weights that carry a config (folders, runs, hub models) use theirs.
    c.init_model = ""
    c.log_every_steps = 50

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # ArrayRecord shards: folder, glob or file
    c.data.val = ""  # held-out images of training taxa (validation loss and zero-shot)
    c.data.heldout = ""  # images of taxa never trained on (zero-shot through the higher ranks)
    c.data.normalization = "imagenet"  # training pixels: BioCLIP's training scripts used ImageNet mean/std
    # "mixed" (BioCLIP 2: "random"): one of sci/com/taxon/sci_com/taxon_com per step; or "mixed_per_sample", or a type
    c.data.text_type = "mixed"
    c.data.crop_scale = (0.9, 1.0)
    c.data.workers = -1  # Grain worker processes; -1: sized for the host (0 on CPU-only hosts), 0: threads
    c.data.prefetch_batches = 2  # host batches made ahead of the training step
    c.data.max_skipped_fraction = 0.001  # unreadable training records are replaced and counted; above this, stop

    # BioCLIP 2's replay: per_batch rows of a second image-text source added to every global batch (on top of
    # train.global_batch_size), trained with their own CLIP loss (models/loss.continual_clip_loss).
    c.replay = ml_collections.ConfigDict()
    # Image-text pairs: ArrayRecord shards (records with a "text" caption), WebDataset tars (img2dataset, LAION,
    # DataComp) or Parquet files with image bytes; a folder, a glob or a list (docs/data_format.md). "" = no replay
    c.replay.data = ""
    c.replay.image_column = ""  # Parquet: the image bytes' column when not jpg/jpeg/png/webp/image/img; "a.b": a field
    c.replay.caption_column = ""  # Parquet: the caption's column when not caption/txt/text
    c.replay.per_batch = 0  # replay rows per global batch; a multiple of the number of devices
    c.replay.text_type = "text"  # the records' own captions; or any data.text_type (a taxonomic replay set)
    c.replay.continual_proj = True  # BioCLIP 2's second visual head for the replay rows; False: through `proj`

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.global_batch_size = 32768
    c.train.steps = 30_000
    c.train.epochs = 0.0  # > 0: steps = epochs x (training split size) / global batch, counted at start
    c.train.lr = 1e-4
    c.train.warmup_steps = 1000
    c.train.weight_decay = 0.2
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.eps = 1e-6
    c.train.grad_clip_norm = 0.0  # 0 = no clipping (BioCLIP)
    c.train.accum_steps = 1
    # True: images that share a caption (one class, in a fine-tune of few classes) are no negatives of each other in
    # the CLIP loss (FLYP-style); False: BioCLIP's loss, every other row a negative
    c.train.distinct_captions = False
    c.train.fsdp = False
    # A command whose model or optimizer structure differs from the run in its workdir is refused; True starts it in a
    # new sub-folder (workdir/restart-N) instead, never over the old run.
    c.train.allow_restart = False
    c.train.trainable = "all"  # "all"; "vision" (text tower frozen, as --lock-text); "lora" (only LoRA pairs train)
    c.train.lora_rank = 8  # rank of the LoRA pairs on attention and MLP weights when trainable="lora"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    # The preprocessing of evaluation and of the exported model ("" = the training normalization). BioCLIP trained
    # with ImageNet statistics but evaluates and releases its model with OpenAI's.
    c.eval.normalization = ""
    c.eval.every_steps = 0  # 0 = no periodic validation (evaluate the result afterwards)
    c.eval.batch_size = 256
    return c
