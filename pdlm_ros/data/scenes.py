"""Synthetic multi-object scenes: coloured, patterned shapes on cluttered backgrounds, with exact masks and captions.

Every scene is a pure function of its seed, so a seed names a training example or a held-out test case forever.
Captions use a closed vocabulary (`vocabulary()`), in one word order: "a {size} {pattern} {color} {shape}".

Invariants the rest of the package relies on:
- every object of a generated scene keeps >= 60 % of its own pixels visible and a box at least 3 px on each side;
- backgrounds are desaturated (HSV saturation <= 0.2), so none of the 8 object hues appears there and a colour word
  is never ambiguous;
- `Scene.instance_mask` is 0 on background and i + 1 where `objects[i]` is the visible (topmost) object.

Rendering is vectorised numpy plus PIL polygon rasterisation on a small supersampled canvas per object (4x, then
box-averaged for anti-aliasing); a scene takes a few milliseconds, which matters because training draws tens of
thousands of them.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from pdlm_ros.errors import DatasetError

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "PATTERNS",
    "ATTRIBUTES",
    "SIZE_EXTENT_PX",
    "HELDOUT_SEED_BASE",
    "ObjectSpec",
    "SceneObject",
    "Scene",
    "caption_for",
    "vocabulary",
    "render_scene",
    "sample_specs",
    "generate_scene",
    "scene_seeds",
    "RenderStyle",
    "STYLE_SHIFTS",
    "generate_shift_scene",
]

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
# Saturated, well separated hues (red 0, orange 30, yellow 55, green 130, cyan 185, blue 225, purple 275, pink 325 deg;
# pink is also lighter than red and purple), so a colour name is never a judgement call.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 55),
    "cyan": (25, 200, 215),
    "blue": (40, 75, 225),
    "purple": (140, 55, 200),
    "pink": (250, 120, 195),
}
SIZES = ("small", "large")
PATTERNS = ("solid", "striped", "dotted")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "size": SIZES,
}
SIZE_EXTENT_PX: dict[str, tuple[float, float]] = {"small": (16.0, 22.0), "large": (30.0, 42.0)}  # across, in px

# Seed ranges: train uses [0, HELDOUT_SEED_BASE), held-out uses [HELDOUT_SEED_BASE, 2 * HELDOUT_SEED_BASE).
HELDOUT_SEED_BASE = 10**12

_SIDE_PX = (96, 176)  # image sides
_ASPECT = (0.6, 1.8)  # width / height
_MIN_VISIBLE = 0.6  # share of an object's own pixels that must stay visible
_MIN_BOX_PX = 3.0  # each side of the visible box
_SS = 4  # supersampling factor of the per-object canvas
_STRIPE_PERIOD_PX = 4.0
_DOT_PERIOD_PX = 5.0
_DOT_RADIUS_PX = 1.25
_MAX_SCENE_TRIES = 50


@dataclass(frozen=True)
class RenderStyle:
    """How a scene is drawn. The defaults are the training renderer's; `STYLE_SHIFTS` holds styles it never uses."""

    supersample: int = _SS  # 1 = no anti-aliasing (hard, stair-stepped edges)
    stripe_period_px: float = _STRIPE_PERIOD_PX
    dot_period_px: float = _DOT_PERIOD_PX
    dot_radius_px: float = _DOT_RADIUS_PX
    size_extent_px: tuple[tuple[float, float], tuple[float, float]] = (SIZE_EXTENT_PX["small"], SIZE_EXTENT_PX["large"])
    background: str = "textured"  # textured (gradient, pattern, clutter, grey noise) or plain (one flat colour)
    spacing: float = 0.7  # centres at least spacing x the sum of circumradii apart (lower: more occlusion)
    min_visible: float = _MIN_VISIBLE
    want_occluded: bool = False  # at least one object with less than 60 % visible (needs min_visible < 0.6)
    noise_sigma: tuple[float, float] = (0.0, 0.0)  # grey noise over the whole image, objects included
    jpeg_quality: tuple[int, int] | None = None  # JPEG round trip at a quality drawn from this range


# Held-out drawing styles (never used in training): other anti-aliasing, other pattern line widths, sizes outside
# the training ranges, plain and noisy backgrounds, JPEG artefacts, heavier occlusion.
STYLE_SHIFTS: dict[str, RenderStyle] = {
    "hard_edges": RenderStyle(supersample=1),
    "pattern_widths": RenderStyle(stripe_period_px=6.5, dot_period_px=7.0, dot_radius_px=1.9),
    "sizes": RenderStyle(size_extent_px=((12.0, 15.5), (44.0, 54.0))),
    "plain_background": RenderStyle(background="plain"),
    "noisy": RenderStyle(noise_sigma=(16.0, 24.0)),
    "jpeg": RenderStyle(jpeg_quality=(15, 35)),
    "occlusion": RenderStyle(spacing=0.45, min_visible=0.35, want_occluded=True),
}
_DEFAULT_STYLE = RenderStyle()


def caption_for(size: str, pattern: str, color: str, shape: str) -> str:
    """The one caption of an object; fixed word order so captions are exact targets."""
    for attr, value in (("size", size), ("pattern", pattern), ("color", color), ("shape", shape)):
        if value not in ATTRIBUTES[attr]:
            raise DatasetError(f"unknown {attr} {value!r}; expected one of {', '.join(ATTRIBUTES[attr])}")
    return f"a {size} {pattern} {color} {shape}"


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    words = {"a", *SIZES, *PATTERNS, *COLORS, *SHAPES}
    return sorted(words)


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw. `extent` is the diameter of the shape's circumscribed circle in px; `rotation` in radians."""

    shape: str
    color: str
    size: str
    pattern: str
    center: tuple[float, float]  # x, y in px
    extent: float
    rotation: float
    track_id: str


@dataclass(frozen=True)
class SceneObject:
    """An object as rendered. `box` and `mask` cover the VISIBLE pixels; x2/y2 are exclusive.

    `visible_fraction` is the share of the object's own pixels that stay visible (occlusion and frame edges);
    an object hidden completely (possible in `render_scene`, never in `generate_scene`) has an empty mask and the box
    (0, 0, 0, 0).
    """

    track_id: str
    shape: str
    color: str
    size: str
    pattern: str
    box: tuple[float, float, float, float]
    mask: np.ndarray  # (H, W) bool
    caption: str
    visible_fraction: float = 1.0


@dataclass(frozen=True)
class Scene:
    """A rendered scene; `instance_mask` is 0 on background and i + 1 where objects[i] is visible."""

    seed: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[SceneObject]
    instance_mask: np.ndarray  # (H, W) uint16

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in px."""
        return int(self.image.shape[1]), int(self.image.shape[0])


# ---------------------------------------------------------------------------------------------------------- shapes
def _unit_outline(shape: str) -> np.ndarray | None:
    """Polygon of a shape with circumradius 1 (None for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        # An equilateral triangle sits high in its circumcircle: centre its box, then shrink it back inside radius 1.
        pts = np.stack([np.cos(a), np.sin(a)], 1) + np.array([0.0, 0.25])
        return pts / np.hypot(*pts[1])
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)  # inner radius 0.45 keeps the points fat enough at 16 px
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "cross":
        w, l = 0.36, 0.93  # arm half-width and half-length: a plus sign whose corners touch the circumcircle
        return np.array([[-w, -l], [w, -l], [w, -w], [l, -w], [l, w], [w, w],
                         [w, l], [-w, l], [-w, w], [-l, w], [-l, -w], [-w, -w]])
    raise DatasetError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


_OUTLINES = {s: _unit_outline(s) for s in SHAPES}
_CIRCLE_RADIUS = 0.82  # a full-radius circle looks much bigger than the polygons of the same circumradius


def _pattern_rgb(fill: np.ndarray) -> np.ndarray:
    """A neutral colour that contrasts with `fill` (near-black on light fills, near-white on dark ones).

    Neutral, never a tint of the fill, so a pattern cannot turn red into pink or orange into brown.
    """
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return np.array([25.0, 25.0, 25.0]) if luma > 110 else np.array([235.0, 235.0, 235.0])


def _object_layer(spec: ObjectSpec, color_jitter: np.ndarray, style: RenderStyle = _DEFAULT_STYLE
                  ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Render one object on its own canvas: (x0, y0, coverage (h, w) in [0, 1], premultiplied rgb (h, w, 3)).

    The canvas is the object's full extent even where it leaves the image, so coverage sums to its true area.
    """
    cx, cy = spec.center
    r = spec.extent / 2.0
    x0, y0 = int(math.floor(cx - r)) - 1, int(math.floor(cy - r)) - 1
    w, h = int(math.ceil(cx + r)) + 2 - x0, int(math.ceil(cy + r)) + 2 - y0
    ss = style.supersample
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    # Supersample k covers [k/SS, (k+1)/SS) px of the local canvas; PIL fills samples by their integer index.
    ox, oy = (cx - x0) * ss - 0.5, (cy - y0) * ss - 0.5
    outline = _OUTLINES[spec.shape]
    if outline is None:
        rr = r * _CIRCLE_RADIUS * ss
        draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=255)
    else:
        c, s = math.cos(spec.rotation), math.sin(spec.rotation)
        pts = outline @ np.array([[c, s], [-s, c]]) * (r * ss)  # rotate, then scale to canvas px
        draw.polygon([(ox + px, oy + py) for px, py in pts], fill=255)
    cov = _box_mean(np.asarray(canvas, dtype=np.float32), ss) / 255.0  # (h, w) coverage

    fill = np.clip(np.asarray(COLORS[spec.color], dtype=np.float32) + color_jitter, 0, 255)
    if spec.pattern == "solid":
        return x0, y0, cov, cov[..., None] * fill
    # The pattern is sampled at 2x (enough to anti-alias 2 px stripes); coordinates live in the object's frame,
    # so stripes and dots rotate with it.
    ss = 2
    ys, xs = np.mgrid[0:h * ss, 0:w * ss].astype(np.float32)
    dx, dy = (xs + 0.5) / ss + (x0 - cx), (ys + 0.5) / ss + (y0 - cy)
    c, s = math.cos(spec.rotation), math.sin(spec.rotation)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if spec.pattern == "striped":
        on = np.mod(u, style.stripe_period_px) < style.stripe_period_px / 2
    else:
        p = style.dot_period_px
        du, dv = np.mod(u + p / 2, p) - p / 2, np.mod(v + p / 2, p) - p / 2
        on = du * du + dv * dv < style.dot_radius_px**2
    share = _box_mean(on.astype(np.float32), ss)[..., None]  # (h, w, 1) share of the pixel covered by pattern
    col = cov[..., None] * (fill + share * (_pattern_rgb(fill) - fill))
    return x0, y0, cov, col


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Average k x k blocks of a 2-D array whose sides are multiples of k."""
    h, w = a.shape[0] // k, a.shape[1] // k
    return a.reshape(h, k, w, k).sum(axis=(1, 3)) * (1.0 / (k * k))


# ------------------------------------------------------------------------------------------------------ background
def _muted(rng: np.random.Generator, v_range: tuple[float, float] = (0.25, 0.85)) -> np.ndarray:
    """A desaturated colour (HSV saturation <= 0.2): greys and tinted greys, never one of the object hues."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.2), rng.uniform(*v_range)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int, style: RenderStyle = _DEFAULT_STYLE) -> np.ndarray:
    """Gradient base, then optional low-contrast stripes/grid/checker and muted clutter blobs, then grey noise.

    Returns float32 (H, W, 3). Every colour comes from `_muted`, and the noise is grey, so no object hue appears.
    Works on planes (3, H, W): numpy broadcasts over a trailing axis of 3 several times slower.
    """
    if style.background == "plain":  # up to near-white: brighter than any training background
        return np.broadcast_to(_muted(rng, (0.25, 1.0)), (height, width, 3)).astype(np.float32)
    a, b = _muted(rng), _muted(rng)
    ang = rng.uniform(0, 2 * np.pi)
    xs = np.arange(width, dtype=np.float32)[None, :]  # (1, W), broadcast against (H, 1)
    ys = np.arange(height, dtype=np.float32)[:, None]
    t = xs * math.cos(ang) + ys * math.sin(ang)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = a[:, None, None] + (b - a)[:, None, None] * t  # (3, H, W)

    kind = rng.integers(0, 4)  # 0 plain, 1 stripes, 2 grid, 3 checker
    if kind:
        period = rng.uniform(6, 18)
        amp = rng.uniform(8, 22) * rng.choice([-1.0, 1.0])
        ca, sa = math.cos(ang + 0.7), math.sin(ang + 0.7)
        u, v = xs * ca + ys * sa, -xs * sa + ys * ca
        if kind == 1:
            pat = np.mod(u, period) < period / 2
        elif kind == 2:
            pat = (np.mod(u, period) < 1.2) | (np.mod(v, period) < 1.2)
        else:
            pat = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
        img += amp * pat

    for _ in range(int(rng.integers(0, 7))):  # clutter: translucent muted ellipses and rectangles
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(4, 28), rng.uniform(4, 28)
        col, alpha = _muted(rng), rng.uniform(0.3, 0.7)
        x0, x1 = max(int(bx - rx), 0), min(int(bx + rx) + 1, width)
        y0, y1 = max(int(by - ry), 0), min(int(by + ry) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        patch = img[:, y0:y1, x0:x1]
        blend = patch * (1 - alpha) + col[:, None, None] * alpha
        if rng.random() < 0.5:
            ex = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - bx) / rx
            ey = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - by) / ry
            blend = np.where(ex * ex + ey * ey < 1.0, blend, patch)
        patch[...] = blend

    sigma = rng.uniform(2.0, 9.0)
    img += rng.standard_normal((height, width), dtype=np.float32) * sigma
    return np.ascontiguousarray(img.transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------------------- scenes
def render_scene(specs: Sequence[ObjectSpec], width: int, height: int, background_seed: int,
                 style: RenderStyle = _DEFAULT_STYLE) -> Scene:
    """Draw `specs` in order (later on top) over the background of `background_seed`.

    No occlusion rule is enforced here (animation may hide an object); check `SceneObject.visible_fraction`.
    The returned `Scene.seed` is `background_seed`.
    """
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise DatasetError(f"scene size must be 8..4096 px per side (got {width}x{height})")
    rng = np.random.default_rng(background_seed)
    img = _background(rng, width, height, style)
    instance = np.zeros((height, width), dtype=np.uint16)
    areas = []
    for i, spec in enumerate(specs):
        caption_for(spec.size, spec.pattern, spec.color, spec.shape)  # raises on an unknown word
        if not (spec.extent > 0 and math.isfinite(spec.extent)):
            raise DatasetError(f"object {spec.track_id!r}: extent must be a positive number of px (got {spec.extent})")
        jitter = rng.uniform(-12, 12, size=3).astype(np.float32)  # small per-object shade variation
        x0, y0, cov, col = _object_layer(spec, jitter, style)
        areas.append(float((cov >= 0.5).sum()))
        # Clip the object's canvas to the image.
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + cov.shape[1], width), min(y0 + cov.shape[0], height)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        c = cov[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        p = col[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        region = img[iy0:iy1, ix0:ix1]
        img[iy0:iy1, ix0:ix1] = region * (1 - c[..., None]) + p
        instance[iy0:iy1, ix0:ix1][c >= 0.5] = i + 1
    if style.noise_sigma[1] > 0:
        img = img + rng.standard_normal((height, width), dtype=np.float32)[..., None] * rng.uniform(*style.noise_sigma)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if style.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(rng.integers(*style.jpeg_quality, endpoint=True)))
        image = np.asarray(Image.open(buf).convert("RGB"))

    objects = []
    for i, spec in enumerate(specs):
        mask = instance == i + 1
        count = int(mask.sum())
        if count:
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
        else:
            box = (0.0, 0.0, 0.0, 0.0)
        objects.append(SceneObject(
            track_id=spec.track_id, shape=spec.shape, color=spec.color, size=spec.size, pattern=spec.pattern,
            box=box, mask=mask, caption=caption_for(spec.size, spec.pattern, spec.color, spec.shape),
            visible_fraction=count / areas[i] if areas[i] else 0.0))
    return Scene(seed=int(background_seed), image=image, objects=objects, instance_mask=instance)


def sample_specs(rng: np.random.Generator, width: int, height: int, n: int,
                 style: RenderStyle = _DEFAULT_STYLE) -> list[ObjectSpec]:
    """Draw up to `n` objects that fit inside the image, with limited overlap.

    Overlap is screened here with circumscribed circles (centres at least 0.7 x the sum of radii apart, which leaves
    most of each object visible); the exact 60 % visibility rule is checked by `generate_scene` on rendered masks.
    Fewer than `n` objects come back only when the image is too crowded to place more.
    """
    if n < 0:
        raise DatasetError(f"number of objects must be >= 0 (got {n})")
    specs: list[ObjectSpec] = []
    placed: list[tuple[float, float, float]] = []
    for k in range(n):
        for _ in range(60):
            size = SIZES[int(rng.integers(0, 2))]
            extent = float(rng.uniform(*style.size_extent_px[SIZES.index(size)]))
            r = extent / 2
            if width < extent + 2 or height < extent + 2:
                continue
            cx = float(rng.uniform(r + 1, width - r - 1))
            cy = float(rng.uniform(r + 1, height - r - 1))
            if all(math.hypot(cx - px, cy - py) >= style.spacing * (r + pr) for px, py, pr in placed):
                break
        else:
            break  # crowded: stop adding objects
        placed.append((cx, cy, r))
        specs.append(ObjectSpec(
            shape=SHAPES[int(rng.integers(0, len(SHAPES)))],
            color=tuple(COLORS)[int(rng.integers(0, len(COLORS)))],
            size=size,
            pattern=PATTERNS[int(rng.integers(0, len(PATTERNS)))],
            center=(cx, cy),
            extent=extent,
            rotation=float(rng.uniform(0, 2 * np.pi)),
            track_id=f"obj{k}",
        ))
    return specs


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    while True:  # rejection: both sides in range and the aspect ratio in range (accepts ~70 % of draws)
        aspect = math.exp(rng.uniform(math.log(_ASPECT[0]), math.log(_ASPECT[1])))
        width = int(rng.integers(_SIDE_PX[0], _SIDE_PX[1] + 1))
        height = int(round(width / aspect))
        if _SIDE_PX[0] <= height <= _SIDE_PX[1]:
            return width, height


def _acceptable(scene: Scene, style: RenderStyle = _DEFAULT_STYLE) -> bool:
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        if obj.visible_fraction < style.min_visible or x2 - x1 < _MIN_BOX_PX or y2 - y1 < _MIN_BOX_PX:
            return False
    return not style.want_occluded or any(o.visible_fraction < _MIN_VISIBLE for o in scene.objects)


def generate_scene(seed: int, *, min_objects: int = 1, max_objects: int = 8,
                   style: RenderStyle = _DEFAULT_STYLE) -> Scene:
    """The scene of `seed`: 96..176 px sides, aspect 0.6..1.8, `min_objects`..`max_objects` objects.

    Layouts that break the visibility rule are re-drawn from the same generator, so the result is still a pure
    function of the seed.
    """
    if not 1 <= min_objects <= max_objects:
        raise DatasetError(f"need 1 <= min_objects <= max_objects (got {min_objects}, {max_objects})")
    if max_objects > 16:
        raise DatasetError(f"max_objects must be <= 16 for scenes of at most 176 px (got {max_objects})")
    rng = np.random.default_rng(seed)
    width, height = _sample_size(rng)
    n = int(rng.integers(min_objects, max_objects + 1))
    if style.want_occluded:
        n = max(n, min(2, max_objects))  # occlusion needs two objects
    for _ in range(_MAX_SCENE_TRIES * (4 if style.want_occluded else 1)):
        specs = sample_specs(rng, width, height, n, style)
        if len(specs) < min_objects:
            continue
        scene = render_scene(specs, width, height, background_seed=int(rng.integers(0, 2**63 - 1)), style=style)
        if _acceptable(scene, style):
            return Scene(seed=seed, image=scene.image, objects=scene.objects, instance_mask=scene.instance_mask)
    raise DatasetError(  # not reached in practice; kept so an impossible request fails loudly, not forever
        f"could not place {min_objects}..{max_objects} objects in a {width}x{height} scene for seed {seed}")


def generate_shift_scene(seed: int, kind: str | None = None) -> tuple[str, Scene]:
    """A held-out scene drawn in a style the training renderer never uses: `kind` from STYLE_SHIFTS, or None for
    the kind of this seed (seeds cycle through the kinds, so any window of seeds covers them evenly)."""
    kinds = tuple(STYLE_SHIFTS)
    if kind is None:
        kind = kinds[seed % len(kinds)]
    if kind not in STYLE_SHIFTS:
        raise DatasetError(f"unknown style shift {kind!r}; expected one of {', '.join(kinds)}")
    return kind, generate_scene(seed, style=STYLE_SHIFTS[kind])


def scene_seeds(split: Literal["train", "heldout"], n: int, offset: int = 0) -> list[int]:
    """`n` consecutive seeds of a split starting at `offset` within it.

    train = [0, HELDOUT_SEED_BASE), heldout = [HELDOUT_SEED_BASE, 2 * HELDOUT_SEED_BASE): the two never share a seed.
    """
    if split not in ("train", "heldout"):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    if n < 0 or offset < 0 or offset + n > HELDOUT_SEED_BASE:
        raise DatasetError(f"need n >= 0, offset >= 0 and offset + n <= {HELDOUT_SEED_BASE} (got n={n}, "
                           f"offset={offset})")
    base = 0 if split == "train" else HELDOUT_SEED_BASE
    return list(range(base + offset, base + offset + n))
