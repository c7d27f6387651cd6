"""A loaded model (config + params + preprocessing) and the public `load`, `create_model` and `encode`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bioclip_jax.convert import state_dict as sd
from bioclip_jax.convert.files import Checkpoint, read_checkpoint
from bioclip_jax.data.transforms import ImageInput, Preprocess, load_image
from bioclip_jax.models.clip import CLIP
from bioclip_jax.models.config import CLIPConfig, get_model_config
from bioclip_jax.tokenizer import tokenize


@dataclasses.dataclass(eq=False)
class Model:
    """Everything needed to embed images and texts. `params` is the plain flax params dict."""

    config: CLIPConfig
    params: dict
    preprocess: Preprocess
    dtype: Any = jnp.float32
    attn_implementation: str | None = "xla"
    source: str = ""

    @functools.cached_property
    def module(self) -> CLIP:
        return CLIP(self.config, dtype=self.dtype, attn_implementation=self.attn_implementation)

    @functools.cached_property
    def _encode_image(self):
        return jax.jit(lambda params, x: self.module.apply({"params": params}, x, method="encode_image"))

    @functools.cached_property
    def _encode_text(self):
        return jax.jit(lambda params, t: self.module.apply({"params": params}, t, method="encode_text"))

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images [B, H, W, 3] -> unnormalised features [B, D] (one compiled shape per B)."""
        return np.array(self._encode_image(self.params, pixels))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return np.array(self._encode_text(self.params, tokens))


def create_model(name: str | CLIPConfig, seed: int = 0, dtype: Any = jnp.float32,
                 attn_implementation: str | None = "xla") -> Model:
    """A randomly initialised model of a named architecture (for training from scratch, tests and demos)."""
    config = get_model_config(name) if isinstance(name, str) else name
    c = config
    images = jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, c.text.context_length), jnp.int32)
    params = jax.jit(CLIP(c).init)(jax.random.key(seed), images, tokens)["params"]
    return Model(config, params, Preprocess(size=c.vision.image_size), dtype, attn_implementation, f"init:{seed}")


def load(path: str | os.PathLike, model: str | None = None, dtype: Any = jnp.float32,
         attn_implementation: str | None = "xla") -> Model:
    """Loads weights from an open_clip folder or file (.safetensors, .bin/.pt) or a bioclip_jax model folder.

    `model` names the architecture (e.g. "ViT-B-16-quickgelu" for BioCLIP) when the weights carry no config: GELU
    and QuickGELU models have identical tensors, so it cannot be guessed. A folder's own config wins when both exist
    and must agree with `model` if given.
    """
    return from_checkpoint(read_checkpoint(path), model, dtype, attn_implementation)


def from_checkpoint(ckpt: Checkpoint, model: str | None = None, dtype: Any = jnp.float32,
                    attn_implementation: str | None = "xla") -> Model:
    """A `Model` from weights already read (see `load`)."""
    config = _resolve_config(ckpt, model)
    params = ckpt.params if ckpt.params is not None else sd.from_open_clip(ckpt.state_dict, config)
    if ckpt.params is not None:
        _check_params(params, config, ckpt.source)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    preprocess = Preprocess.from_open_clip(ckpt.preprocess_cfg, config.vision.image_size)
    return Model(config, params, preprocess, dtype, attn_implementation, ckpt.source)


def _resolve_config(ckpt: Checkpoint, model: str | None) -> CLIPConfig:
    if ckpt.model_cfg is not None:
        config = CLIPConfig.from_open_clip(ckpt.model_cfg, name=model or "")
        if model is not None and get_model_config(model).to_open_clip() != config.to_open_clip():
            raise ValueError(f"{ckpt.source}: its config {config.to_open_clip()} does not match model={model!r} "
                             f"({get_model_config(model).to_open_clip()}); drop `model` to use the folder's config")
        return config
    if model is None:
        fits = sd.fitting_architectures(ckpt.state_dict) if ckpt.state_dict is not None else []
        hint = f" (these weights fit: {', '.join(fits)})" if fits else ""
        raise ValueError(f"{ckpt.source}: these weights carry no model config; pass the architecture, e.g. "
                         f"model='ViT-B-16-quickgelu' for BioCLIP{hint}. GELU and QuickGELU models have the same "
                         "tensors, so it cannot be inferred.")
    return get_model_config(model)


def _check_params(params: dict, config: CLIPConfig, source: str) -> None:
    from flax import traverse_util

    expected = sd.param_shapes(config)
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
    problems = [f"missing {'/'.join(p)} {s}" for p, s in expected.items() if p not in got]
    problems += [f"unexpected {'/'.join(p)}" for p in got if p not in expected]
    problems += [f"{'/'.join(p)}: got {got[p]}, expected {s}" for p, s in expected.items() if p in got and got[p] != s]
    if problems:
        raise sd.StateDictMismatch(f"{source}: params do not match the config:\n  " + "\n  ".join(problems[:30]))


def bucket_sizes(batch_size: int) -> list[int]:
    """Padded batch shapes: powers of two below batch_size, and batch_size itself (a handful of compiles at most)."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


def _run_padded(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    n = len(inputs)
    size = next(s for s in bucket_sizes(batch_size) if s >= n)
    if size > n:
        pad = np.zeros((size - n,) + inputs.shape[1:], inputs.dtype)
        inputs = np.concatenate([inputs, pad])
    return fn(inputs)[:n]


def as_image_list(images) -> Sequence[ImageInput]:
    """One image (a path, a PIL image, an [H, W, C] array) or many (a list, a generator, an [N, H, W, C] array)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
        return [images]
    return list(images)


def encode(model: Model, images=None, texts=None, normalize: bool = True, batch_size: int = 32,
           preprocess: Preprocess | str | None = None, progress: bool = False):
    """Embeds images and/or texts. Returns float32 numpy [N, D] (a tuple (images, texts) when both are given).

    images: paths, PIL images or uint8 arrays (or one [N, H, W, 3] array). texts: strings. `preprocess`: None for the
    model's own (open_clip eval transform), "pybioclip" for pybioclip's squash, or a `Preprocess`.
    """
    if images is None and texts is None:
        raise ValueError("encode needs images=, texts= or both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    if images is not None:
        outputs.append(_encode_images(model, as_image_list(images), batch_size, _pick_preprocess(model, preprocess),
                                      progress))
    if texts is not None:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = tokenize(texts, model.config.text.context_length)
        feats = [_run_padded(model.encode_tokens, tokens[i:i + batch_size], batch_size)
                 for i in tqdm(range(0, len(tokens), batch_size), desc="texts", disable=not progress)]
        outputs.append(np.concatenate(feats) if feats else np.zeros((0, model.config.embed_dim), np.float32))
    if normalize:
        outputs = [x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) for x in outputs]
    outputs = [x.astype(np.float32) for x in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _pick_preprocess(model: Model, preprocess: Preprocess | str | None) -> Preprocess:
    if preprocess is None:
        return model.preprocess
    if preprocess == "pybioclip":
        return model.preprocess.pybioclip_squash()
    if isinstance(preprocess, Preprocess):
        return preprocess
    raise ValueError(f"preprocess={preprocess!r}: expected None, 'pybioclip' or a Preprocess")


def _encode_images(model: Model, images: Sequence[ImageInput], batch_size: int, preprocess: Preprocess,
                   progress: bool) -> np.ndarray:
    if not images:
        return np.zeros((0, model.config.embed_dim), np.float32)
    def prepare(src):
        return preprocess(load_image(src))

    # PIL decodes and resizes outside the GIL, so threads prepare the next batch while the device runs this one;
    # only two batches of pixels are held at a time.
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    feats = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(images), desc="images", disable=not progress) as bar:
        pending = [pool.submit(prepare, src) for src in chunks[0]]
        for i in range(len(chunks)):
            current = pending
            pending = [pool.submit(prepare, src) for src in chunks[i + 1]] if i + 1 < len(chunks) else []
            batch = np.stack([f.result() for f in current])
            feats.append(_run_padded(model.encode_pixels, batch, batch_size))
            bar.update(len(batch))
    return np.concatenate(feats)
