"""Scenes of the demo world: an exact scene graph per image and its anti-aliased rendering.

Shapes are the object classes, colours and sizes the attributes. Every shape fills its square
box exactly and contains the box centre, so the scene graph's boxes are the true boxes and the
pixel at a box centre carries the object's colour (the tests check both).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {  # RGB; pairwise distances > 85 so jitter never changes the name
    "red": (210, 40, 45),
    "green": (45, 165, 70),
    "blue": (45, 90, 215),
    "yellow": (235, 215, 40),
    "purple": (135, 60, 190),
    "orange": (240, 125, 30),
    "gray": (150, 150, 150),
}
SIZES: tuple[str, ...] = ("small", "large")

_REFERENCE_SIDE = 128  # object sizes and margins below are for this image side and scale with it
_SIDE_RANGE = {"small": (14, 20), "large": (28, 38)}
_SUPERSAMPLE = 4
_SHIFT = 4  # cv2 sub-pixel bits for polygon vertices


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its class, attributes and integer pixel box (x, y, w, h)."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    w: int
    h: int

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the box centre, for spatial relations."""
        return (self.x + self.w / 2, self.y + self.h / 2)

    @property
    def center_pixel(self) -> tuple[int, int]:
        """(row, col) of a pixel every shape covers fully."""
        return (self.y + self.h // 2, self.x + self.w // 2)


@dataclass(frozen=True)
class Scene:
    """The exact scene graph of one image."""

    width: int
    height: int
    objects: tuple[SceneObject, ...]

    def count(self, shape: str | None = None, color: str | None = None, size: str | None = None) -> int:
        """How many objects match every given attribute."""
        return sum(1 for o in self.objects
                   if (shape is None or o.shape == shape) and (color is None or o.color == color)
                   and (size is None or o.size == size))


@dataclass(frozen=True)
class Theme:
    """A few shapes and colours most objects of a related set of images draw from (NLVR2 sets)."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]


def margin(side: int) -> float:
    """Minimum centre offset, in pixels, for a spatial relation to count as unambiguous."""
    return 6.0 * side / _REFERENCE_SIDE


def sample_theme(rng: np.random.Generator, n_shapes: int = 3, n_colors: int = 3) -> Theme:
    """Pick the shapes and colours of a set of related images."""
    shapes = rng.choice(len(SHAPES), n_shapes, replace=False)
    colors = rng.choice(len(COLORS), n_colors, replace=False)
    names = list(COLORS)
    return Theme(tuple(SHAPES[i] for i in sorted(shapes)), tuple(names[i] for i in sorted(colors)))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _attributes(rng: np.random.Generator, placed: list[SceneObject], theme: Theme | None) -> tuple[str, str]:
    """Shape and colour of a new object; repeats are common so counts above one occur."""
    colors = list(COLORS)
    if theme is not None and rng.random() < 0.85:
        return _pick(rng, theme.shapes), _pick(rng, theme.colors)
    shape = _pick(rng, SHAPES)
    color = _pick(rng, colors)
    if placed and rng.random() < 0.35:
        shape = placed[int(rng.integers(len(placed)))].shape
    elif placed and rng.random() < 0.15:
        color = placed[int(rng.integers(len(placed)))].color
    return shape, color


def _fits(x: int, y: int, s: int, placed: list[SceneObject], gap: int) -> bool:
    return all(x + s + gap <= o.x or o.x + o.w + gap <= x or y + s + gap <= o.y or o.y + o.h + gap <= y
               for o in placed)


def sample_scene(rng: np.random.Generator, side: int, min_objects: int, max_objects: int,
                 theme: Theme | None = None) -> Scene:
    """Draw a scene graph of min..max objects whose boxes never overlap (so every object is seen whole)."""
    scale = side / _REFERENCE_SIDE
    border = max(1, round(2 * scale))
    gap = max(1, round(3 * scale))
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        placed: list[SceneObject] = []
        for _ in range(n):
            shape, color = _attributes(rng, placed, theme)
            size = _pick(rng, SIZES)
            for attempt_size in ((size, "small") if size == "large" else (size,)):
                lo, hi = _SIDE_RANGE[attempt_size]
                s = int(rng.integers(round(lo * scale), round(hi * scale) + 1))
                spots = rng.integers(border, side - s - border + 1, size=(40, 2)).tolist()
                spot = next(((x, y) for x, y in spots if _fits(x, y, s, placed, gap)), None)
                if spot is not None:
                    placed.append(SceneObject(shape, color, attempt_size, spot[0], spot[1], s, s))
                    break
        if len(placed) >= min_objects:
            return Scene(side, side, tuple(placed))


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices of the shape in the unit box, x right and y down, touching all four sides."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1)
    if shape == "square":
        return np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    if shape == "triangle":
        return np.array([[0.5, 0], [1, 1], [0, 1]], float)
    if shape == "diamond":
        return np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]], float)
    if shape == "hexagon":
        return np.array([[0.25, 0], [0.75, 0], [1, 0.5], [0.75, 1], [0.25, 1], [0, 0.5]], float)
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        return np.array([[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b], [b, 1], [a, 1], [a, b], [0, b],
                         [0, a], [a, a]], float)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        return (pts - pts.min(0)) / (pts.max(0) - pts.min(0))
    raise ValueError(f"unknown shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape filling a side x side box (supersampled)."""
    big = side * _SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    pts = np.round(_POLYGONS[shape] * big * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_8, shift=_SHIFT)
    return cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (rows, cols) of a side x side patch; read-only, shared."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A muted, darkish texture (clouds, stripes or checks) with grain and faint lines, float RGB."""
    hue = rng.uniform(0, 180)
    hsv = np.array([[[hue, rng.uniform(0, 80), rng.uniform(45, 110)]]], np.float32)
    base = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    cells = int(rng.integers(3, 9))
    clouds = cv2.resize(rng.normal(0, 1, (cells, cells, 3)).astype(np.float32), (side, side),
                        interpolation=cv2.INTER_CUBIC)
    img = base + 16 * clouds
    yy, xx = _grid(side)
    kind = int(rng.integers(3))
    if kind == 1:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(5, 16) * side / _REFERENCE_SIDE
        img += (10 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period))[..., None]
    elif kind == 2:
        cell = max(2, int(rng.integers(6, 16) * side / _REFERENCE_SIDE))
        img += (8 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1))[..., None]
    for _ in range(int(rng.integers(1, 4))):
        p1 = tuple(int(v) for v in rng.integers(0, side, 2))
        p2 = tuple(int(v) for v in rng.integers(0, side, 2))
        shade = tuple(float(v) for v in base + rng.uniform(-35, 35, 3))
        cv2.line(img, p1, p2, shade, 1, cv2.LINE_AA)
    img += 4 * rng.standard_normal(img.shape, dtype=np.float32)
    return img


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene as an (H, W, 3) uint8 RGB image; objects get colour jitter, shading and grain."""
    img = _background(rng, scene.width)
    for o in scene.objects:
        alpha = shape_mask(o.shape, o.w)[..., None]
        color = np.array(COLORS[o.color], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = _grid(o.w)
        ramp = ((xx - o.w / 2) * np.cos(angle) + (yy - o.h / 2) * np.sin(angle)) / (o.w / 2)
        shading = rng.uniform(5, 15) * ramp
        fill = color + shading[..., None] + 2.5 * rng.standard_normal((o.h, o.w, 3), dtype=np.float32)
        region = img[o.y:o.y + o.h, o.x:o.x + o.w]
        img[o.y:o.y + o.h, o.x:o.x + o.w] = region * (1 - alpha) + fill * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour closest to an RGB pixel (how a reader of the image names its colour)."""
    names = list(COLORS)
    pixel = np.asarray(rgb, np.float32)
    dist = [float(np.sum((pixel - np.array(COLORS[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(dist))]
