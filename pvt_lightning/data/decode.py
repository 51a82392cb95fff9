"""Bytes on disk -> RGB uint8 HWC array, with OpenCV, surviving the image files real folders contain.

Handled: grayscale, palette, RGBA / LA (composited on white), CMYK JPEG, 16-bit (scaled to 8 bit),
EXIF orientation (honoured by OpenCV for JPEG), and large images: JPEGs decoded at 1/2, 1/4 or 1/8
size, other formats halved after decoding, while the result still covers the size the transforms need.
Animated GIF / PNG / WebP files give their first frame (one warning per process).

Refused with ``BadImageError`` (the image is skipped and counted, or stops the run with
``bad_images='error'``): anything OpenCV cannot decode (zero bytes, truncated, not an image), files
that are not regular files (a FIFO or device named x.jpg is never opened for a blocking read), and
images whose header declares more than ``max_pixels`` pixels (decompression bombs: a 1 MB PNG can
declare 30000x30000 = 900 MP, 2.7 GB decoded). The header is read before any decoding, for JPEG,
PNG, GIF, BMP, WebP, TIFF and PNM; content of another format is left to OpenCV's own limit (2^30 pixels).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import cv2
import numpy as np

from pvt_lightning.errors import BadImageError, printable

log = logging.getLogger("pvt_lightning.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                              ".gif"})
"""Files with these extensions (any case) are images; every other file in a class folder is ignored."""

DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
"""Pixel budget per image: Pillow's decompression-bomb limit (2 x 1 GiB / 4 / 3), e.g. 13377 x 13377.
Decoded as 8-bit RGB that is 537 MB per image in each loader worker; larger images are refused."""

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# IMREAD_REDUCED_COLOR_{2,4,8} decode to BGR; swap their colour bit for IMREAD_COLOR_RGB.
_REDUCED_RGB = {r: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB for r, flag in
                ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))}


def is_image_file(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | Path, min_side: int = 0, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode the file at ``path`` to RGB uint8 (H, W, 3); ``min_side`` allows reduced JPEG decoding,
    ``max_pixels`` is the pixel budget (None: no limit)."""
    return decode_image(read_file(path, max_pixels), min_side=min_side, name=os.fspath(path), max_pixels=max_pixels)


def read_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of an image file, refusing (``BadImageError``) what is not a regular file, cannot be read,
    or is larger than any image within ``max_pixels`` could be; never blocks on a FIFO."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise BadImageError(name, f"cannot read file ({error.strerror})") from None
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(name, f"not a regular file ({_file_kind(info.st_mode)}); only image files are read")
        if max_pixels and info.st_size > max_file_bytes(max_pixels):
            raise BadImageError(name, f"file of {info.st_size / 2**20:.0f} MiB is larger than any image within "
                                      f"the pixel budget of {max_pixels:,} pixels could be (max_image_pixels)")
        try:
            return file.read()
        except OSError as error:
            raise BadImageError(name, f"cannot read file ({error.strerror})") from None


def _pixels(count: int) -> str:
    return f"{count / 1e6:,.0f} MP" if count >= 10**6 else f"{count:,} pixels"


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can be: 16-bit RGBA uncompressed (8 bytes a pixel) plus 64 MiB."""
    return 8 * max_pixels + 64 * 2**20


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")]
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def decode_image(data: bytes, min_side: int = 0, name: str = "<bytes>",
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (H, W, 3).

    Args:
        data: the encoded file contents.
        min_side: the shorter side the result must keep at least (0: always full resolution).
            Images whose shorter side is >= 2x this come back at 1/2, 1/4 or 1/8 scale (JPEGs are
            decoded at that scale directly, which is also faster).
        name: the file name used in error messages.
        max_pixels: the pixel budget, checked against the size the header declares before decoding
            (None or 0: no limit). The declared size counts, even where a JPEG is decoded reduced.
    """
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    size = image_size(data)
    if max_pixels and size is not None and size[0] * size[1] > max_pixels:
        height, width = size
        raise BadImageError(name, f"declares {width}x{height} = {_pixels(width * height)}, over the pixel budget "
                                  f"of {_pixels(max_pixels)} (a decompression bomb or a huge scan; raise "
                                  "max_image_pixels / --max-image-pixels to allow it)")
    if _is_animated(data):
        _warn_animated_once(name)
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


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) that the file's header declares, read without decoding; None if unknown or not found."""
    try:
        for magic, reader in _SIZE_READERS:
            if data.startswith(magic):
                size = reader(data)
                return size if size is not None and size[0] > 0 and size[1] > 0 else None
    except (IndexError, ValueError):  # a header cut short
        return None
    return None


def _u16(data: bytes, at: int, order: str = "little") -> int:
    return int.from_bytes(data[at:at + 2], order)


def _u32(data: bytes, at: int, order: str = "little") -> int:
    return int.from_bytes(data[at:at + 4], order)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return _u32(data, 20, "big"), _u32(data, 16, "big")


def _gif_size(data: bytes) -> tuple[int, int]:
    return _u16(data, 8), _u16(data, 6)  # the logical screen: the canvas every frame is drawn on


def _bmp_size(data: bytes) -> tuple[int, int]:
    if _u32(data, 14) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return _u16(data, 20), _u16(data, 18)
    return abs(int.from_bytes(data[22:26], "little", signed=True)), abs(int.from_bytes(data[18:22], "little", signed=True))


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one
        return int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, after the 0x2f signature
        bits = _u32(data, 21)
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the 9d 01 2a start code
        return _u16(data, 28) & 0x3FFF, _u16(data, 26) & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first IFD (the first page)."""
    order = "little" if data[:2] == b"II" else "big"
    ifd = _u32(data, 4, order)
    sizes = {}
    for k in range(_u16(data, ifd, order)):
        entry = ifd + 2 + 12 * k
        tag, kind = _u16(data, entry, order), _u16(data, entry + 2, order)
        if tag in (256, 257):
            sizes[tag] = _u16(data, entry + 8, order) if kind == 3 else _u32(data, entry + 8, order)
    return (sizes[257], sizes[256]) if len(sizes) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    """P1-P6 headers: magic, width, height as whitespace-separated tokens, '#' comments to the end of a line."""
    tokens: list[bytes] = []
    for line in data[:4096].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 3:
            return int(tokens[2]), int(tokens[1])
    return None


_SIZE_READERS = [
    (_JPEG_MAGIC, lambda data: jpeg_size(data)),
    (_PNG_MAGIC, _png_size),
    (b"GIF87a", _gif_size), (b"GIF89a", _gif_size),
    (b"BM", _bmp_size),
    (b"RIFF", _webp_size),
    (b"II*\x00", _tiff_size), (b"MM\x00*", _tiff_size),
    *((magic, _pnm_size) for magic in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")),
]


def _is_animated(data: bytes) -> bool:
    """An animated GIF (2+ frames), APNG (acTL chunk before the pixels) or animated WebP (VP8X flag)."""
    if data.startswith((b"GIF87a", b"GIF89a")):
        return gif_frame_count(data, stop_at=2) > 1
    if data.startswith(_PNG_MAGIC):
        first_pixels = data.find(b"IDAT")
        return data.find(b"acTL", 8, first_pixels if first_pixels > 0 else len(data)) > 0
    if data.startswith(b"RIFF") and data[8:16] == b"WEBPVP8X" and len(data) > 20:
        return bool(data[20] & 0x02)
    return False


def gif_frame_count(data: bytes, stop_at: int = 0) -> int:
    """Image descriptors in a GIF, walking its blocks without decoding (stops early at ``stop_at`` if > 0)."""
    def skip_sub_blocks(i: int) -> int:
        while i < len(data) and data[i]:
            i += data[i] + 1
        return i + 1

    def skip_colour_table(i: int, flags: int) -> int:
        return i + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)

    frames, i = 0, skip_colour_table(13, data[10] if len(data) > 10 else 0)
    while i < len(data) and not (stop_at and frames >= stop_at):
        block = data[i]
        if block == 0x21:  # extension: introducer, label, data sub-blocks
            i = skip_sub_blocks(i + 2)
        elif block == 0x2C:  # image descriptor: 10 bytes, local colour table, LZW code size, data sub-blocks
            frames += 1
            i = skip_sub_blocks(skip_colour_table(i + 10, data[i + 9] if i + 9 < len(data) else 0) + 1)
        else:  # 0x3B trailer, or garbage
            break
    return frames


_warned_animated = False


def _warn_animated_once(name: str) -> None:
    global _warned_animated
    if not _warned_animated:
        _warned_animated = True
        log.warning("%s is animated: using its first frame only (further animated images are not reported)",
                    printable(name))


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
