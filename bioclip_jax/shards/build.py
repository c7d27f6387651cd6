"""The one path from a raw example to the bytes of a record (docs/data_format.md): every source of make-shards, and
any other writer that must produce the same records, goes through `build_record`.

    record = build_record(Example("a.jpg", raw_bytes, taxon, label="magpie"), source="folder", resize=224)
"""

from __future__ import annotations

import dataclasses
import io
import re

from PIL import Image

from bioclip_jax.data.records import Record
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.data.transforms import ImageTooLarge, decode_image, to_rgb
from bioclip_jax.errors import InputError


class Skip(Exception):
    """A sample that cannot become a record: `reason` is a short stable key counted in summaries."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Example:
    """One raw sample of a source: `image` is encoded bytes in any format PIL reads, or a drawn PIL image."""
    id: str
    image: bytes | Image.Image
    taxon: Taxon
    label: str = ""


def describe(e: BaseException) -> str:
    """An exception as one line, without the object addresses PIL puts in messages (summaries must not change
    from run to run)."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")


def encode_image(src: bytes | Image.Image, *, resize: int | None = None, quality: int = 95) -> bytes:
    """Image bytes (any format PIL reads) or a PIL image -> RGB JPEG bytes, optionally squashed to resize x resize
    (bicubic, aspect not kept, as BioCLIP's shards). Raises Skip for undecodable or truncated data.

    An RGB JPEG that is not resized is stored byte for byte: re-encoding would only lose quality."""
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            img = decode_image(src, "image")  # decode everything now, not later in a training worker
        except ImageTooLarge as e:
            raise Skip("image too large", str(e).removeprefix("image: ")) from None
        except InputError as e:
            raise Skip("undecodable image", describe(e.__cause__)) from None
        if img.format == "JPEG" and img.mode == "RGB" and not resize:
            return bytes(src)
    try:
        img = to_rgb(img)
        if resize and img.size != (resize, resize):
            img = img.resize((resize, resize), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    except Exception as e:  # e.g. a mode PIL cannot convert to RGB
        raise Skip("undecodable image", describe(e)) from None
    return buf.getvalue()


def build_record(example: Example, *, source: str, resize: int | None = None, quality: int = 95) -> bytes:
    """A raw example -> its record bytes (JPEG image, `source` as Record.source); raises Skip when the image cannot be
    used. Pure: the same example and settings give the same bytes in any process."""
    jpeg = encode_image(example.image, resize=resize, quality=quality)
    return Record(id=example.id, image=jpeg, taxon=example.taxon, source=source, label=example.label).to_bytes()
