"""A loaded model (config + params + preprocessing) and the public `load`, `create_model` and `encode`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bioclip_jax.convert import checkpoint
from bioclip_jax.convert.files import Checkpoint, load_model_config
from bioclip_jax.data.transforms import ImageInput, Preprocess, load_image
from bioclip_jax.errors import InputError
from bioclip_jax.models.clip import CLIP, init_params
from bioclip_jax.models.config import CLIPConfig
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
    config = load_model_config(name) if isinstance(name, str) else name
    params = jax.jit(init_params, static_argnums=(0,))(config, seed)
    return Model(config, params, Preprocess(size=config.vision.image_size), dtype, attn_implementation,
                 f"init:{seed}")


def load(path: str | os.PathLike, model: str | None = None, dtype: Any = jnp.float32,
         attn_implementation: str | None = "xla") -> Model:
    """Loads weights from an open_clip folder or file (.safetensors, .bin/.pt) or a bioclip_jax model folder.

    `model` names the architecture (e.g. "ViT-B-16-quickgelu" for BioCLIP) when the weights carry no config: GELU
    and QuickGELU models have identical tensors, so it cannot be guessed. A folder's own config wins when both exist
    and must agree with `model` if given.
    """
    return from_checkpoint(checkpoint.read(path), model, dtype, attn_implementation)


def from_checkpoint(ckpt: Checkpoint, model: str | None = None, dtype: Any = jnp.float32,
                    attn_implementation: str | None = "xla") -> Model:
    """A `Model` from weights already read (see `load`)."""
    resolved = checkpoint.resolve(ckpt, model)
    params = jax.tree_util.tree_map(jnp.asarray, resolved.params)
    preprocess = Preprocess.from_open_clip(resolved.preprocess_cfg, resolved.config.vision.image_size)
    return Model(resolved.config, params, preprocess, dtype, attn_implementation, resolved.source)


def normalize_features(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (as torch.nn.functional.normalize, eps 1e-12), float32."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


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

    images: paths, PIL images or uint8 arrays (or one [N, H, W, 3] array). texts: strings. `preprocess`: None (or
    "open_clip") for the model's own (open_clip eval transform), "pybioclip" for pybioclip's squash, or a `Preprocess`.
    """
    if images is None and texts is None:
        raise InputError("encode needs images=, texts= or both")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    if images is not None:
        outputs.append(_encode_images(model, as_image_list(images), batch_size, pick_preprocess(model, preprocess),
                                      progress))
    if texts is not None:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = tokenize(texts, model.config.text.context_length)
        feats = [_run_padded(model.encode_tokens, tokens[i:i + batch_size], batch_size)
                 for i in tqdm(range(0, len(tokens), batch_size), desc="texts", disable=not progress)]
        outputs.append(np.concatenate(feats) if feats else np.zeros((0, model.config.embed_dim), np.float32))
    outputs = [normalize_features(x) if normalize else x.astype(np.float32) for x in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def pick_preprocess(model: Model, preprocess: Preprocess | str | None) -> Preprocess:
    """None or "open_clip": the model's own (open_clip eval transform); "pybioclip": pybioclip's squash; a
    `Preprocess` as given."""
    if preprocess is None or preprocess == "open_clip":
        return model.preprocess
    if preprocess == "pybioclip":
        return model.preprocess.pybioclip_squash()
    if isinstance(preprocess, Preprocess):
        return preprocess
    raise InputError(f"preprocess={preprocess!r}: expected 'pybioclip', 'open_clip' (or None) or a Preprocess")


# pybioclip's (torch's) device names -> JAX platforms.
_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu", "mps": "METAL"}


def on_device(model: Model, device: Any = None) -> Model:
    """The model with its params on `device` ("cpu", "cuda"/"gpu", "tpu", "cuda:1", a jax.Device or a torch.device);
    None keeps JAX's default device. Computations follow the params, so encode runs there."""
    if device is None:
        return model
    if not isinstance(device, jax.Device):
        platform, _, index = str(device).lower().partition(":")
        if platform not in _PLATFORMS or (index and not index.isdigit()):
            raise InputError(f"device {device!r}: expected one of cpu, cuda, gpu, tpu (optionally :INDEX)")
        try:
            devices = jax.devices(_PLATFORMS[platform])
        except RuntimeError:
            have = sorted({d.platform for d in jax.devices()})
            raise InputError(f"device {device!r}: JAX has no {_PLATFORMS[platform]} backend here (it has {have}); "
                             "install jax[cuda12] for NVIDIA GPUs or jax[tpu] for TPUs") from None
        if int(index or 0) >= len(devices):
            raise InputError(f"device {device!r}: only {len(devices)} {_PLATFORMS[platform]} device(s)")
        device = devices[int(index or 0)]
    return dataclasses.replace(model, params=jax.device_put(model.params, device))


def _encode_images(model: Model, images: Sequence[ImageInput], batch_size: int, preprocess: Preprocess,
                   progress: bool) -> np.ndarray:
    feats = [f for _, f in iter_image_features(model, images, batch_size, preprocess, progress=progress)]
    return np.concatenate(feats) if feats else np.zeros((0, model.config.embed_dim), np.float32)


# What `load_image` and the preprocessing raise for one bad image (a missing file, an undecodable or refused one);
# the other images of a batch are still embedded when the caller collects failures.
IMAGE_ERRORS = (OSError, ValueError, TypeError)


def iter_image_features(model: Model, images: Sequence[ImageInput], batch_size: int, preprocess: Preprocess,
                        failures: dict[int, str] | None = None, progress: bool = True,
                        callback: Callable[[int, int], None] | None = None,
                        desc: str = "images") -> Iterator[tuple[list[int], np.ndarray]]:
    """Streams (positions, unnormalised features [B', D]) one batch at a time, so memory stays flat in the number of
    images. Worker threads decode and preprocess the next batch while the device runs this one.

    failures: None raises on the first bad image; a dict collects {position: why} and the batch goes on without it.
    callback(processed, total), as pybioclip's, replaces the progress bar."""
    def prepare(j):
        try:
            return preprocess(load_image(images[j]))
        except InputError as e:  # a file's errors name it; an array or PIL image is named by its position
            if isinstance(images[j], (str, os.PathLike)):
                raise
            raise InputError(f"image {j}: {e}") from None

    total = len(images)
    chunks = [range(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]
    # PIL decodes and resizes outside the GIL; only two batches of pixels are held at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=total, desc=desc, unit="images", disable=not progress or callback is not None) as bar:
        pending = [pool.submit(prepare, j) for j in chunks[0]] if chunks else []
        for i, chunk in enumerate(chunks):
            current = pending
            pending = [pool.submit(prepare, j) for j in chunks[i + 1]] if i + 1 < len(chunks) else []
            positions, pixels = [], []
            for j, future in zip(chunk, current):
                try:
                    pixels.append(future.result())
                    positions.append(j)
                except IMAGE_ERRORS as e:
                    if failures is None:
                        for f in pending:
                            f.cancel()
                        raise
                    failures[j] = str(e)
            if pixels:
                yield positions, _run_padded(model.encode_pixels, np.stack(pixels), batch_size)
            bar.update(len(chunk))
            if callback is not None:
                callback(chunk.stop, total)
