"""Bytes on disk -> RGB uint8 HWC array, with OpenCV, surviving the image files real folders contain.

Handled: grayscale, palette, RGBA / LA (composited on white), CMYK JPEG, 16-bit (scaled to 8 bit),
EXIF orientation (honoured by OpenCV for JPEG), and large images: JPEGs decoded at 1/2, 1/4 or 1/8
size, other formats halved after decoding, while the result still covers the size the transforms need. Anything else that OpenCV
cannot decode (zero bytes, truncated, not an image) raises ``BadImageError``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import BadImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""Files with these extensions (any case) are images; every other file in a class folder is ignored."""

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# IMREAD_REDUCED_COLOR_{2,4,8} decode to BGR; swap their colour bit for IMREAD_COLOR_RGB.
_REDUCED_RGB = {r: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB for r, flag in
                ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))}


def is_image_file(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | Path, min_side: int = 0) -> np.ndarray:
    """Decode the file at ``path`` to RGB uint8 (H, W, 3); ``min_side`` allows reduced JPEG decoding."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BadImageError(str(path), f"cannot read file ({error.strerror})") from None
    return decode_image(data, min_side=min_side, name=str(path))


def decode_image(data: bytes, min_side: int = 0, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (H, W, 3).

    Args:
        data: the encoded file contents.
        min_side: the shorter side the result must keep at least (0: always full resolution).
            Images whose shorter side is >= 2x this come back at 1/2, 1/4 or 1/8 scale (JPEGs are
            decoded at that scale directly, which is also faster).
        name: the file name used in error messages.
    """
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        if data.startswith(_PNG_MAGIC) and _png_has_alpha(data):
            image = _composite_on_white(cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED))
        else:
            image = cv2.imdecode(buffer, _jpeg_flags(data, min_side))  # 16-bit and gray become 8-bit RGB here
    except cv2.error as error:
        raise BadImageError(name, f"OpenCV cannot decode it ({error.err})") from None
    if image is None or image.size == 0:
        raise BadImageError(name, "not a decodable image (corrupt, truncated or not an image despite its extension)")
    return _shrink(image, min_side)


def _jpeg_flags(data: bytes, min_side: int) -> int:
    """IMREAD flags for ``data``: the strongest JPEG reduction that keeps the shorter side >= ``min_side``."""
    if min_side > 0 and data.startswith(_JPEG_MAGIC):
        size = jpeg_size(data)
        if size is not None:
            for factor, flags in _REDUCED_RGB.items():
                if min(size) // factor >= min_side:
                    return flags
    return cv2.IMREAD_COLOR_RGB


def _shrink(image: np.ndarray, min_side: int) -> np.ndarray:
    """Halve non-JPEG images (INTER_AREA, anti-aliased) while the shorter side stays >= ``min_side``.

    The same contract as reduced JPEG decoding, so the transforms never downscale by 2x or more and
    can use fast bilinear resizing without aliasing.
    """
    factor = 1
    while min_side > 0 and min(image.shape[:2]) // (factor * 2) >= min_side:
        factor *= 2
    if factor == 1:
        return image
    height, width = image.shape[:2]
    return cv2.resize(image, (width // factor, height // factor), interpolation=cv2.INTER_AREA)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame marker, without decoding; None if not found."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _png_has_alpha(data: bytes) -> bool:
    """True for PNG colour types 4 (gray+alpha) and 6 (RGBA), or a tRNS chunk before the pixel data."""
    if len(data) < 26:
        return False
    if data[25] in (4, 6):
        return True
    first_pixels = data.find(b"IDAT")
    return data.find(b"tRNS", 8, first_pixels if first_pixels > 0 else len(data)) > 0


def _composite_on_white(image: np.ndarray | None) -> np.ndarray | None:
    """IMREAD_UNCHANGED output (gray / BGR / BGRA, 8 or 16 bit) -> RGB uint8 over a white background."""
    if image is None:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    alpha = image[..., 3:].astype(np.float32) / 255.0
    composited = image[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return cv2.cvtColor(np.rint(composited).astype(np.uint8), cv2.COLOR_BGR2RGB)
