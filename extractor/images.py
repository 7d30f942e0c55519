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

An image is stored under its file stem (``image_id``); ``coco_img_id`` and ``read_img_id_list`` give the
same ids for COCO numbers and for files listing images.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from extractor.jsonstream import DataFormatError, load_json

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                              ".ppm", ".pgm", ".pbm"})
DEFAULT_MAX_PIXELS = 89_478_485
"""Images with more pixels are refused from their header, before decoding. The value is Pillow's own warning
threshold (2^30 / 4 / 3: 256 MiB as 8-bit RGB, e.g. 10,000 x 8,900). Decoding holds the file, the decoded image
and its RGB and BGR arrays, about 1 GiB per decoding worker at this size; larger scans need a raised limit
(``max_pixels``, ``--max-pixels``) and the memory to match."""
_PILLOW_CHECK = threading.Lock()  # guards Pillow's global limit while _pillow_check_off holds it off
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


def coco_img_id(image_id: int, split: str) -> str:
    """The stem of a COCO 2014/2015 file name: COCO_<split>_<image id on 12 digits>."""
    if split == "test-dev2015":  # VQA's test-dev questions are on test2015 images
        split = "test2015"
    return f"COCO_{split}_{image_id:012d}"


def read_img_id_list(path: str | os.PathLike, numbers_as: str | None = "val2014") -> list[str]:
    """Image ids from a JSON list or a text file (one per line).

    Bare integers are COCO ids of the `numbers_as` split (LXMERT's minival list holds val2014
    numbers); numbers_as=None keeps them verbatim, as Visual Genome / GQA image ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"id list not found: {path}")
    text_ids: list[Any]
    if path.suffix == ".json":
        text_ids = load_json(path)
        if not isinstance(text_ids, list):
            raise DataFormatError(f"{path}: expected a JSON list of image ids")
    else:
        text_ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, v in enumerate(text_ids):
        if isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.isdigit():
            out.append(coco_img_id(int(v), numbers_as) if numbers_as else str(v))
        elif isinstance(v, str):
            out.append(v)
        else:
            raise DataFormatError(f"{path}: entry {i}: {v!r} is not an image id")
    return out


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


@contextlib.contextmanager
def _pillow_check_off() -> Iterator[None]:
    """Let ``max_pixels`` decide alone: Pillow refuses images over twice its global ``Image.MAX_IMAGE_PIXELS``
    while it opens them, before our check can name the size or a raised limit can apply. Only the first frame
    is decoded, and its size is ours to check, so Pillow's check is off (under a lock, restored) meanwhile."""
    with _PILLOW_CHECK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _unreadable(p: Path, e: OSError) -> str:
    """Reason for a file that cannot be read, telling broken symlinks apart from missing files."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(e, FileNotFoundError):
        return f"dangling symlink -> {os.readlink(p)}" if p.is_symlink() else "not found"
    if isinstance(e, IsADirectoryError):
        return "not a file"
    return f"unreadable: {e.strerror or e}"


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to (H, W, 3) uint8 BGR, or raise ImageReadError with a short reason.

    Reasons: "not found", "dangling symlink -> TARGET", "symlink loop", "not a file", "unreadable: ...",
    "empty file", "not an image", "truncated", "corrupt: ...", "too large: WxH pixels > max_pixels",
    "unsupported mode M".
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageReadError(path, _unreadable(p, e)) from None
    if not data:
        raise ImageReadError(path, "empty file")
    with _pillow_check_off():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageReadError(path, "not an image") from None
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


def _check_ids(paths: list[Path], where: list[str]) -> None:
    """Refuse names the feature store cannot hold (not UTF-8) and two images with the same stem, naming them."""
    undecodable = [f"{w}: {os.fsencode(p)!r}" for p, w in zip(paths, where) if _not_utf8(p)]
    if undecodable:
        raise ValueError(f"image paths that are not valid UTF-8 (rename them): {_some(undecodable)}")
    seen: dict[str, int] = {}
    for j, p in enumerate(paths):
        key = image_id(p)
        if key in seen:
            i = seen[key]
            raise ValueError(f"duplicate image id {key!r}: {paths[i]} ({where[i]}) and {p} ({where[j]})")
        seen[key] = j


def _not_utf8(p: Path) -> bool:
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode kept the bytes as surrogate escapes
        return True
    return False


def _some(items: list[str]) -> str:
    more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
    return "; ".join(items[:10]) + more


def list_images(dir_or_list: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The images to process, checked before any work starts.

    A directory: every file with an image extension below it (case-insensitive, hidden files and
    folders skipped), sorted; symlinks among them are listed even when broken, so that a dangling or
    looping link becomes a failure entry rather than vanishing. An image file: just that image. Any
    other file: one path per line, relative paths against the list's folder, blank lines and ``#``
    comments skipped. A Python list: its entries. Entries with nothing at their path (neither a file
    nor a symlink) raise FileNotFoundError naming them (and their lines); names that are not UTF-8 and
    two images with the same id raise ValueError naming them.
    """
    if isinstance(dir_or_list, str | os.PathLike):
        src = Path(dir_or_list)
        if src.is_dir():
            paths = sorted(p for p in src.rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
                           and not any(part.startswith(".") for part in p.relative_to(src).parts))
            _check_ids(paths, [str(src)] * len(paths))
            return paths
        if not src.exists():
            link = f" (a dangling symlink -> {os.readlink(src)})" if src.is_symlink() else ""
            raise FileNotFoundError(f"images: {src} does not exist{link}")
        if src.suffix.lower() in IMAGE_EXTENSIONS:
            _check_ids([src], ["images"])
            return [src]
        paths, where = [], []
        with open(src, encoding="utf-8", errors="surrogateescape") as f:  # bad bytes: refused by line below
            for lineno, line in enumerate(f, 1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    p = Path(entry)
                    paths.append(p if p.is_absolute() else src.parent / p)
                    where.append(f"{src}:{lineno}")
    else:
        paths = [Path(p) for p in dir_or_list]
        where = [f"entry {i}" for i in range(len(paths))]
    missing = [f"{w}: {p}" for p, w in zip(paths, where) if not (p.is_file() or p.is_symlink())]
    if missing:
        raise FileNotFoundError(f"images not found: {_some(missing)}")
    _check_ids(paths, where)
    return paths
