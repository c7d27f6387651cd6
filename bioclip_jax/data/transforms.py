"""Image preprocessing on the host with PIL, step for step as open_clip's torchvision transforms.

Evaluation (open_clip `image_transform(is_train=False)`): resize the shortest side with PIL bicubic, center crop,
convert to RGB (after resizing, as open_clip does), scale to [0, 1], normalise. pybioclip's Tree-of-Life path instead
squashes the whole image to size x size (bilinear). PIL is used rather than jax.image.resize because their filters
differ.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import threading
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
        if cfg is not None and not isinstance(cfg, dict):
            raise InputError(f"preprocess_cfg: expected an object of fields, got {type(cfg).__name__}")
        cfg = dict(cfg or {})
        cfg_size = cfg.get("size", size)
        cfg_size = cfg_size[0] if isinstance(cfg_size, (list, tuple)) and cfg_size else cfg_size
        if not isinstance(cfg_size, int) or isinstance(cfg_size, bool) or cfg_size <= 0:
            raise InputError(f"preprocess_cfg: size={cfg.get('size')!r}: expected a positive integer")
        return cls(size=cfg_size, mean=_channels(cfg, "mean", OPENAI_MEAN), std=_channels(cfg, "std", OPENAI_STD),
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
        if 0 in image.size:  # resizing would divide by its zero side
            raise InputError(f"a {image.size[0]}x{image.size[1]} image has no pixels")
        image = to_8bit(image)  # a no-op for 8-bit images; a 16-bit or float one would otherwise become white
        resample = _INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "pybioclip":
            pixels = resize_bilinear_antialias(image, self.size, self.size) / np.float32(255)
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


def _channels(cfg: dict, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """preprocess_cfg's mean or std: three numbers (a std of zero would divide by it)."""
    value = cfg.get(key, default)
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and (key != "std" or all(v > 0 for v in value)))
    if not ok:
        raise InputError(f"preprocess_cfg: {key}={value!r}: expected three {'positive ' if key == 'std' else ''}"
                         "numbers, one per RGB channel")
    return tuple(float(v) for v in value)


def resize_shortest(image: Image.Image, size: int, resample) -> Image.Image:
    """torchvision Resize(int): shortest side -> size, the other int(size * long / short); no-op if already there."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def resize_bilinear_antialias(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Image (converted to RGB) -> float32 [height, width, 3] in 0..255, as torchvision's Resize((h, w),
    antialias=True) on the float tensor (pybioclip's ToTensor, then the resize): each channel resized as a 32-bit
    float image by PIL's antialiased bilinear filter, the scheme torch's antialias follows (within 2e-5 of torch after
    /255, as the dense numpy resampling matrix used before was, in an eighth of its time: docs/performance.md). No
    rounding to 8 bits in between."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    bands = [band.convert("F").resize((width, height), Image.BILINEAR) for band in image.split()]
    return np.stack([np.asarray(band, np.float32) for band in bands], axis=-1)


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


# ------------------------------------------------------------------------------------------------ loading images
# Every image bioclip_jax reads (predict, embed, encode, eval, training, make-shards) goes through `_open`, so the same
# rules hold everywhere (docs/data_format.md, "Images"):
# - Decompression bombs: an image with more than `max_image_pixels()` pixels (width x height, from the header, before
#   any pixel is decoded) is refused with `ImageTooLarge`, per image. PIL itself only warns between its limit and twice
#   it, and raises DecompressionBombError (not an OSError) above; bioclip_jax replaces that rule with its own single
#   threshold, so PIL's check is off while bioclip_jax parses a header (under a lock: PIL's limit is a global).
# - Bit depth: 16-bit, 32-bit integer and float images are scaled to 8 bits (`to_8bit`); PIL's own conversion
#   clips them (a 16-bit PNG becomes white).
# - EXIF orientation is NOT applied, as in open_clip and pybioclip (both call Image.open + convert("RGB") only):
#   the pixels are used as stored. (PIL itself applies it when it loads a TIFF; that holds here as there.)
# - Other modes (P, L, LA, RGBA, CMYK, ...) stay as decoded: Preprocess converts them to RGB after resizing, as
#   open_clip does.
MAX_IMAGE_PIXELS_ENV = "BIOCLIP_JAX_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default threshold (its warning level): 1024 * 1024 * 1024 // 4 // 3
# The library knob: an int sets the limit (0: no limit); None reads $BIOCLIP_JAX_MAX_IMAGE_PIXELS, else the default.
# Grain worker processes inherit the environment variable, so set that when training with data.workers > 0.
MAX_IMAGE_PIXELS: int | None = None
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLarge(InputError):
    """An image over the pixel limit (a possible decompression bomb); refused before its pixels are decoded."""


def max_image_pixels() -> int:
    """The pixel limit in force: MAX_IMAGE_PIXELS, else $BIOCLIP_JAX_MAX_IMAGE_PIXELS, else PIL's default; 0 = none."""
    if MAX_IMAGE_PIXELS is not None:
        return int(MAX_IMAGE_PIXELS)
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
        if value < 0:
            raise ValueError
    except ValueError:
        raise InputError(f"{MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a pixel count >= 0 (0: no limit)") from None
    return value


def check_image_size(size: tuple[int, int], where, limit: int | None = None) -> None:
    """Raises ImageTooLarge naming `where` if width x height is over the limit."""
    limit = max_image_pixels() if limit is None else limit
    width, height = size
    if limit and width * height > limit:
        raise ImageTooLarge(f"{where}: {width}x{height} image ({width * height:,} pixels) is over the limit of "
                            f"{limit:,} pixels (decompression-bomb guard; raise it with {MAX_IMAGE_PIXELS_ENV}=N or "
                            f"bioclip_jax.data.transforms.MAX_IMAGE_PIXELS, 0 for no limit)")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*"), 32-bit integer ("I") and float ("F") images -> 8-bit "L"; other modes unchanged.

    16-bit is divided by 257 (65535 -> 255); "I" too when any value exceeds 255 (PIL opens some 16-bit files as
    "I"); "F" in [0, 1] is multiplied by 255, otherwise taken as 0..255; everything rounded and clipped."""
    if img.mode not in _SIXTEEN_BIT and img.mode not in ("I", "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: high bit depths scaled (`to_8bit`); alpha dropped as `Image.convert("RGB")` does, which is
    what open_clip / pybioclip loaders do at training and eval time."""
    if img.mode == "RGB":
        return img
    img = to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting transparent palettes straight to RGB
    return img.convert("RGB")


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image (8-bit); InputError naming `where` (a file, a record) if they do
    not decode, ImageTooLarge if over the pixel limit."""
    return _open(io.BytesIO(data), where)


def _open(file, where) -> Image.Image:
    limit = max_image_pixels()
    try:
        with _PIL_LIMIT_LOCK:  # PIL's check off while it parses the header: bioclip_jax's limit is the rule
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(file)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        check_image_size(image.size, where, limit)
        image.load()  # decode now, so a truncated file fails here, naming it
        return to_8bit(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file not found") from None
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        detail = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))  # no object addresses: stable messages
        raise InputError(f"{where}: cannot decode image ({type(e).__name__}: {detail})") from e


def load_image(source: ImageInput) -> Image.Image:
    """A path, PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) as an 8-bit PIL image, by the rules above
    (pixel limit, bit depth, no EXIF rotation); errors (InputError, ImageTooLarge) name the file."""
    if isinstance(source, Image.Image):  # already opened by the caller: the pixel limit is for files and bytes
        return to_8bit(source)
    if isinstance(source, np.ndarray):
        channels_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))
        if source.dtype != np.uint8 or not channels_ok:
            raise InputError(f"image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {source.dtype} "
                             f"{source.shape}")
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    if isinstance(source, (str, os.PathLike)):
        return _open(source, source)
    raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(source).__name__}")
