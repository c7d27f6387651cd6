"""Image preprocessing on the host with PIL, step for step as open_clip's torchvision transforms.

Evaluation (open_clip `image_transform(is_train=False)`): resize the shortest side with PIL bicubic, center crop, convert
to RGB (after resizing, as open_clip does), scale to [0, 1], normalise. pybioclip's Tree-of-Life path instead squashes the
whole image to size x size (bilinear). PIL is used rather than jax.image.resize because their filters differ.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Union

import numpy as np
from PIL import Image

from bioclip_jax.errors import InputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {"openai": (OPENAI_MEAN, OPENAI_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                   "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
# "pybioclip": pybioclip's Tree-of-Life transform, ToTensor first, then an antialiased bilinear squash on floats.
_RESIZE_MODES = ("shortest", "squash", "pybioclip")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing, with the fields of open_clip's `preprocess_cfg`."""

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest" + center crop (open_clip eval), "squash" or "pybioclip"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise InputError(f"interpolation={self.interpolation!r}: expected one of {sorted(_INTERPOLATIONS)}")
        if self.resize_mode not in _RESIZE_MODES:
            raise InputError(f"resize_mode={self.resize_mode!r}: expected one of {_RESIZE_MODES}")

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any] | None, size: int) -> "Preprocess":
        cfg = dict(cfg or {})
        cfg_size = cfg.get("size", size)
        cfg_size = cfg_size[0] if isinstance(cfg_size, (list, tuple)) else cfg_size
        return cls(size=int(cfg_size), mean=tuple(cfg.get("mean", OPENAI_MEAN)), std=tuple(cfg.get("std", OPENAI_STD)),
                   interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"))

    def to_open_clip(self) -> dict[str, Any]:
        squash = self.resize_mode == "pybioclip"  # open_clip's nearest equivalent
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": "bilinear" if squash else self.interpolation,
                "resize_mode": "squash" if squash else self.resize_mode}

    def pybioclip_squash(self) -> "Preprocess":
        """pybioclip's Tree-of-Life preprocessing: squash to size x size, antialiased bilinear on floats, no crop."""
        return dataclasses.replace(self, resize_mode="pybioclip", interpolation="bilinear")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> float32 [size, size, 3], normalised."""
        resample = _INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "pybioclip":
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
            pixels = resize_bilinear_antialias(pixels, self.size, self.size)
            return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.resize_mode == "squash":
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), resample)
        else:
            image = center_crop(resize_shortest(image, self.size, resample), self.size)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
        return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def resize_shortest(image: Image.Image, size: int, resample) -> Image.Image:
    """torchvision Resize(int): shortest side -> size, the other int(size * long / short); no-op if already there."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of an antialiased linear (triangle) filter: PIL's scheme, which torch's antialias=True follows."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # widen the triangle when downsampling, so every input pixel contributes
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) / support))
        weights[i, lo:hi] = taps / taps.sum()
    return weights.astype(np.float32)


def resize_bilinear_antialias(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """float [H, W, C] -> [height, width, C], as torchvision Resize((h, w), antialias=True) on a float tensor."""
    rows = _bilinear_weights(pixels.shape[0], height)
    cols = _bilinear_weights(pixels.shape[1], width)
    return np.einsum("ij,jkc,lk->ilc", rows, pixels, cols, optimize=True).astype(np.float32)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop: offsets rounded with Python's round; pads with black if the image is smaller."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image; InputError naming `where` (a file, a record) if they do not decode."""
    return _open(io.BytesIO(data), where)


def _open(file, where) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()  # decode now, so a truncated file fails here, naming it
        return image
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise InputError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(source: ImageInput) -> Image.Image:
    """A path, PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) as a PIL image; errors name the file."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise InputError(f"image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {source.dtype} "
                             f"{source.shape}")
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    if isinstance(source, (str, os.PathLike)):
        return _open(source, source)
    raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(source).__name__}")
