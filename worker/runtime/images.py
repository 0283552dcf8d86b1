"""Turning a job's image (inline bytes or a URL) into pixels, within limits.

PIL reads the header (format, size: the limits apply before any pixel is decoded); OpenCV decodes
the pixels, as ultralytics' own loader does, in one call that releases the GIL (4× faster than
PIL on a JPEG photo, 20 % on a small PNG). When OpenCV refuses the data, PIL decodes it instead,
so a damaged image gets the specific reason PIL gives. Decoding runs in a thread pool, except for
small images (`ImageHeader.cheap`), which cost less to decode where they are than to hand to a
thread; fetching (`worker.fetch`) runs on the event loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from schemas.errors import ErrorCode, JobFailure
from worker.runtime.backend import Image

# Opened by their own plugin, never through `PIL.Image.open`: ultralytics replaces that
# function with one that tries to install packages when it meets an unknown format.
_OPENERS = (
    (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
)

# Our own pixel limit applies before decoding; PIL's guard would only warn below 2× its default.
PILImage.MAX_IMAGE_PIXELS = None

# Handing a decode to a thread and its pixels back costs the two threads 50-100 µs of CPU on a
# busy 2-vCPU VM (wake-ups of parked threads); decoding an image of at most 64 × 64 pixels and
# 16 KiB costs 3-40 µs (OpenCV, PNG or JPEG), so such images are decoded where they are.
# The README's Performance section has the measurements.
CHEAP_PIXELS = 64 * 64
CHEAP_BYTES = 16 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    fetch_timeout_s: float = 10.0  # the whole fetch of a URL, redirects included
    read_timeout_s: float = 5.0  # one connect, or one wait for more of the body
    file_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ImageHeader:
    """An image whose header has been read and found within the limits; no pixel decoded yet."""

    data: bytes
    picture: PILImage.Image  # PIL's view of the header; decodes the pixels when OpenCV cannot

    @property
    def pixels(self) -> int:
        width, height = self.picture.size
        return int(width * height)

    @property
    def cheap(self) -> bool:
        """Cheaper to decode in the calling thread than to hand to another."""
        return self.pixels <= CHEAP_PIXELS and len(self.data) <= CHEAP_BYTES


def decode_image(data: bytes, limits: ImageLimits) -> Image:
    """Decode JPEG, PNG or WebP bytes into an H×W×3 BGR uint8 array."""
    return decode_pixels(read_header(data, limits))


def read_header(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Check the bytes and the header against the limits (cheap: decompression bombs stop here)."""
    if not data:
        raise JobFailure(ErrorCode.EMPTY_IMAGE, "image data is empty")
    if len(data) > limits.max_bytes:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_LARGE, f"image is {len(data)} bytes; the limit is {limits.max_bytes}"
        )
    picture = _open(data)
    width, height = picture.size
    if width == 0 or height == 0:
        raise JobFailure(ErrorCode.EMPTY_IMAGE, f"image is {width}×{height} pixels")
    if width * height > limits.max_pixels:
        raise JobFailure(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {width}×{height} = {width * height} pixels; the limit is {limits.max_pixels}",
        )
    return ImageHeader(data, picture)


def decode_pixels(header: ImageHeader) -> Image:
    """The H×W×3 BGR pixels of an image whose header passed `read_header`."""
    pixels = _decode_with_opencv(header.data, header.picture.format)
    return pixels if pixels is not None else _decode_with_pil(header.picture)


# Every JPEG ends with this marker; OpenCV before 5 decodes a JPEG that stops early into a
# partly grey image with only a warning, so a JPEG without it goes to PIL, which says "truncated".
_JPEG_END = b"\xff\xd9"


def _decode_with_opencv(data: bytes, image_format: str | None) -> Image | None:
    """BGR pixels, or None when OpenCV cannot decode the data (or should not be trusted to)."""
    if image_format == "JPEG" and not data.endswith(_JPEG_END):
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None or pixels.ndim != 3 or pixels.dtype != np.uint8:
        return None
    return cast(Image, pixels)


def _decode_with_pil(picture: PILImage.Image) -> Image:
    try:
        picture.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise JobFailure(_damage_code(exc), f"image data is damaged: {exc}") from exc
    rgb = ImageOps.exif_transpose(picture).convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


def _open(data: bytes) -> PILImage.Image:
    """Read the header only (no pixels yet) of a JPEG, PNG or WebP image."""
    opener: type[PILImage.Image] | None = None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        opener = WebPImagePlugin.WebPImageFile
    for magic, plugin in _OPENERS:
        if data.startswith(magic):
            opener = plugin
    if opener is None:
        raise JobFailure(ErrorCode.NOT_AN_IMAGE, "bytes are not a JPEG, PNG or WebP image")
    try:
        return opener(io.BytesIO(data))  # type: ignore[call-arg]
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise JobFailure(_damage_code(exc), f"unreadable image header: {exc}") from exc


def _damage_code(exc: Exception) -> ErrorCode:
    # PIL says "truncated" (in various cases) for data that stops early, in header or pixels.
    return ErrorCode.TRUNCATED_IMAGE if "truncated" in str(exc).lower() else ErrorCode.NOT_AN_IMAGE
