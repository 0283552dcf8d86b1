import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from schemas.errors import ErrorCode, JobFailure
from worker.runtime.images import ImageHeader, ImageLimits, decode_image, read_header

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, fetch_timeout_s=2.0)


def encode(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=(10, 200, 30) if mode == "RGB" else 128).save(buffer, format=fmt)
    return buffer.getvalue()


def rejected(data: bytes, limits: ImageLimits = LIMITS) -> ErrorCode:
    with pytest.raises(JobFailure) as caught:
        decode_image(data, limits)
    return caught.value.code


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_bgr(fmt: str) -> None:
    image = decode_image(encode(fmt), LIMITS)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    blue, green, red = image[10, 10].tolist()
    assert green > 150 and red < 60 and blue < 80


def test_grayscale_and_alpha_become_three_channels() -> None:
    assert decode_image(encode("PNG", mode="L"), LIMITS).shape == (48, 64, 3)
    assert decode_image(encode("PNG", mode="RGBA"), LIMITS).shape == (48, 64, 3)


def test_pixels_equal_what_ultralytics_reads_from_disk(bus_jpg: Path) -> None:
    # ultralytics' own loader is cv2.imdecode; detections can only match if the pixels do.
    ours = decode_image(bus_jpg.read_bytes(), ImageLimits(max_bytes=10**7, max_pixels=10**7))
    theirs = cv2.imdecode(np.fromfile(bus_jpg, np.uint8), cv2.IMREAD_COLOR)
    assert theirs is not None
    assert np.array_equal(ours, theirs)


def rotated_jpeg() -> bytes:
    """64×48 pixels, left half red, with EXIF orientation 6: shown turned 90° clockwise."""
    picture = Image.new("RGB", (64, 48), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_exif_orientation_is_applied_by_either_decoder() -> None:
    # Bytes after the end marker send a JPEG to PIL, which must orient it as OpenCV does.
    data = rotated_jpeg()
    for variant in (data, data + b"trailing bytes after the end marker"):
        image = decode_image(variant, LIMITS)
        assert image.shape == (64, 48, 3)
        top, bottom = image[5, 24].tolist(), image[58, 24].tolist()
        assert top[2] > 200 and top[0] < 60, f"top row should be red (BGR), got {top}"
        assert bottom[0] > 200 and bottom[2] < 60, f"bottom row should be blue (BGR), got {bottom}"


def test_bad_images_get_specific_codes() -> None:
    jpeg = encode("JPEG", size=(256, 256))
    assert rejected(b"") is ErrorCode.EMPTY_IMAGE
    assert rejected(b"hello, I am text") is ErrorCode.NOT_AN_IMAGE
    assert rejected(encode("GIF")) is ErrorCode.NOT_AN_IMAGE
    assert rejected(encode("BMP")) is ErrorCode.NOT_AN_IMAGE
    assert rejected(jpeg[: len(jpeg) // 2]) is ErrorCode.TRUNCATED_IMAGE
    assert rejected(jpeg[:400]) is ErrorCode.TRUNCATED_IMAGE  # cut inside the header
    png = encode("PNG", size=(300, 300))
    assert rejected(png[: len(png) // 2]) in {ErrorCode.TRUNCATED_IMAGE, ErrorCode.NOT_AN_IMAGE}
    assert rejected(jpeg, ImageLimits(max_bytes=100, max_pixels=10**6)) is ErrorCode.IMAGE_TOO_LARGE
    assert rejected(jpeg, ImageLimits(max_bytes=10**6, max_pixels=256 * 255)) is ErrorCode.TOO_MANY_PIXELS


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 20000×20000 of one colour compresses to a few hundred kB but would take 1.2 GB decoded.
    bomb = encode("PNG", size=(20000, 20000), mode="L")
    assert len(bomb) < LIMITS.max_bytes
    assert rejected(bomb) is ErrorCode.TOO_MANY_PIXELS


def test_zero_sized_png_header_is_empty_or_invalid() -> None:
    png = bytearray(encode("PNG", size=(1, 1)))
    png[16:24] = (0).to_bytes(4, "big") * 2  # IHDR width and height
    assert rejected(bytes(png)) in {ErrorCode.EMPTY_IMAGE, ErrorCode.NOT_AN_IMAGE}


def test_only_small_images_are_cheap_enough_to_decode_where_they_are() -> None:
    def header(data: bytes) -> ImageHeader:
        return read_header(data, LIMITS)

    assert header(encode("PNG", size=(64, 64))).cheap and header(encode("JPEG", size=(32, 128))).cheap
    assert not header(encode("PNG", size=(65, 64))).cheap
    padded = io.BytesIO()  # few pixels, many bytes: a text chunk of 20 kB
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * 20_000)
    Image.new("RGB", (8, 8)).save(padded, format="PNG", pnginfo=info)
    assert not header(padded.getvalue()).cheap
