"""Image decoding for extraction: what ``cv2.imread(path, IMREAD_COLOR)`` gives, but strict about bad files.

Rules (the Caffe detector was fed by ``cv2.imread``, so we decode to the same pixels):
- result is (H, W, 3) uint8 BGR; EXIF orientation is applied (as ``cv2.imread`` does by default);
- grayscale and bilevel images are replicated to three channels;
- alpha (RGBA, LA, palettes with transparency) is dropped, not composited: the colour under a
  transparent pixel is kept, as ``IMREAD_COLOR`` does;
- 16-bit images keep their high byte (value >> 8), as libpng's 16-to-8 strip does;
- CMYK JPEGs (Adobe, inverted) are converted with R = (255 - C)(255 - K) / 255, as libjpeg/OpenCV do;
- a multi-frame file gives its first frame.
Unlike ``cv2.imread``, truncated JPEG/PNG files are refused rather than padded with grey.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                              ".ppm", ".pgm", ".pbm"})
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's bomb limit (about 179 MP); it caps larger values
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_TO_RGB = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageReadError(Exception):
    """An image that cannot be decoded; ``reason`` is short and machine-friendly ("truncated", ...)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def image_id(path: str | os.PathLike) -> str:
    """The id an image is stored under: its file stem (COCO_train2014_000000132417, 2375429, ...)."""
    return Path(path).stem


def _truncation(data: bytes, fmt: str | None) -> bool:
    """True when a JPEG lacks its end-of-image marker or a PNG its IEND chunk (decoders may not notice)."""
    if fmt == "JPEG":
        last_scan = data.rfind(b"\xff\xda")
        return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0
    if fmt == "PNG":
        end = data.rfind(b"IEND")
        return end < 0 or len(data) < end + 8  # chunk type + 4 CRC bytes
    return False


def _decode_failure(e: Exception) -> str:
    """Reason for a decoder exception: "truncated" when the data ran out, else "corrupt: ..."."""
    if "truncated" in str(e).lower():
        return "truncated"
    return f"corrupt: {type(e).__name__}: {e}"


def _to_rgb(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any supported mode, following the module's rules."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode not in _TO_RGB:
        raise ImageReadError(path, f"unsupported mode {mode}")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency: expand, then drop alpha below
    return np.asarray(im.convert("RGB"))


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to (H, W, 3) uint8 BGR, or raise ImageReadError with a short reason.

    Reasons: "not found", "not a file", "unreadable: ...", "empty file", "not an image",
    "truncated", "corrupt: ...", "too large: WxH pixels > max_pixels", "unsupported mode M".
    Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) also applies.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "not a file") from None
    except OSError as e:
        raise ImageReadError(path, f"unreadable: {e.strerror or e}") from None
    if not data:
        raise ImageReadError(path, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageReadError(path, "not an image") from None
        except Image.DecompressionBombError as e:
            raise ImageReadError(path, f"too large: {e}") from None
        except Exception as e:  # untrusted bytes: any decoder error means a bad file
            raise ImageReadError(path, _decode_failure(e)) from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(path, f"too large: {w}x{h} pixels > {max_pixels}")
            if w == 0 or h == 0:
                raise ImageReadError(path, f"corrupt: size {w}x{h}")
            try:
                im.load()
            except Exception as e:  # untrusted bytes, as above
                raise ImageReadError(path, _decode_failure(e)) from None
            if _truncation(data, im.format):
                raise ImageReadError(path, "truncated")
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:  # a broken EXIF block is a broken file
                raise ImageReadError(path, f"corrupt: bad EXIF: {e}") from None
            rgb = _to_rgb(im, path)
    return np.ascontiguousarray(rgb[..., ::-1])


def _check_unique(paths: list[Path], where: list[str]) -> None:
    """Two images with the same stem would collide in the feature store: refuse, naming both."""
    seen: dict[str, int] = {}
    for j, p in enumerate(paths):
        key = image_id(p)
        if key in seen:
            i = seen[key]
            raise ValueError(f"duplicate image id {key!r}: {paths[i]} ({where[i]}) and {p} ({where[j]})")
        seen[key] = j


def list_images(dir_or_list: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The images to process, checked before any work starts.

    A directory: every file with an image extension below it (case-insensitive, hidden files and
    folders skipped), sorted. An image file: just that image. Any other file: one path per line,
    relative paths against the list's folder, blank lines and ``#`` comments skipped. A Python
    list: its entries. Missing entries raise FileNotFoundError naming them (and their lines);
    two images with the same id raise ValueError naming both.
    """
    if isinstance(dir_or_list, str | os.PathLike):
        src = Path(dir_or_list)
        if src.is_dir():
            paths = sorted(p for p in src.rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(src).parts))
            _check_unique(paths, [str(src)] * len(paths))
            return paths
        if not src.exists():
            raise FileNotFoundError(f"images: {src} does not exist")
        if src.suffix.lower() in IMAGE_EXTENSIONS:
            return [src]
        paths, where = [], []
        with open(src, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    p = Path(entry)
                    paths.append(p if p.is_absolute() else src.parent / p)
                    where.append(f"{src}:{lineno}")
    else:
        paths = [Path(p) for p in dir_or_list]
        where = [f"entry {i}" for i in range(len(paths))]
    missing = [f"{w}: {p}" for p, w in zip(paths, where) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise FileNotFoundError(f"images not found: {'; '.join(missing[:10])}{more}")
    _check_unique(paths, where)
    return paths
