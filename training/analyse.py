"""Reading a scene back from its pixels: background, object colour, shape, size and position.

The analyser is deterministic and knows only the scene grammar of :mod:`training.shapes`, so
it can score any image that claims to show such a scene, whether rendered or generated:

1. **Background**: the per-channel median of the border pixels, named by the nearest colour of
   :data:`~training.shapes.COLORS`.
2. **Object mask**, in two passes. First, on a 3x3 median-filtered copy (speckle removed): pixels
   farther (Euclidean RGB) from the background than half the distance between the background's
   named colour and its nearest other named colour (clamped to 30..60). Then, on the image itself:
   pixels more than halfway from the background colour towards the object's colour (projected on
   the line between them), so that a soft edge is cut where it is half object; they must lie
   within a pixel of the same test on the filtered copy. After each pass holes are filled and only
   the largest 8-connected component is kept.
3. **Object colour**: the named colour nearest to the median of the object pixels farthest from the
   background (the half of them farthest: the core, not the anti-aliased or blurred rim).
4. **Shape**: a triangle narrows towards its top (the mean width of the top quarter of its box is
   well under that of the bottom quarter); otherwise the share of the box the object fills
   separates a square (about 1) from a circle (about pi/4). The box is the bounding box less end
   rows and columns under a fifth of the widest, so a stray edge pixel does not stretch it.
5. **Size**: the half-side implied by the area for the recognised shape, named by the nearest value
   of :data:`~training.shapes.SIZES` on a log scale (scaled to the image size).
6. **Position**: the anchor point (the centroid, moved up by a fifth of the half-side for a
   triangle, whose centroid lies below its anchor) in a 3x3 grid whose cell borders lie halfway
   between the nine anchors of :data:`~training.shapes.POSITIONS`.

The recovered class map is the object mask labelled with its shape's class (0 elsewhere).

:func:`analyse_pair` reads a scene of two shapes (:class:`~training.shapes.Pair`): the same
background and first pass, kept as every component of at least the least area; one component
holding two named colours (two shapes that touch) is split by colour. Each object is then read as
above, its second pass limited to the pixels near it, so the other shape never joins it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from training.shapes import COLORS, POSITIONS, SHAPES, SIZE, SIZES

_NAMES: tuple[str, ...] = tuple(COLORS)
_RGB = np.asarray([COLORS[name] for name in _NAMES], dtype=np.float32)
# half-side -> area, per shape, as Scene.render draws them (square: side 2 * 0.9 r; triangle: 2r x 1.8r)
_AREA_FACTOR: dict[str, float] = {"circle": math.pi, "square": (2 * 0.9) ** 2, "triangle": 0.5 * 2 * 1.8}
_MIN_AREA = 12  # pixels at 64x64; anything smaller is noise, not an object
_CENTROID_DROP = {"triangle": 0.2}  # centroid below the anchor, in half-sides


@dataclass
class Analysis:
    """What :func:`analyse` read from an image. Without an object, the object fields are ``None``."""

    background: str
    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    mask: np.ndarray  # (H, W) bool, the object's pixels
    class_map: np.ndarray  # (H, W) uint8, 0 = background, 1 + shape index on the object

    @property
    def found(self) -> bool:
        return self.shape is not None


@dataclass
class ObjectReading:
    """One object of a two-object scene: what it looks like, where its anchor is (image fractions)."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    mask: np.ndarray  # (H, W) bool


@dataclass
class PairAnalysis:
    """What :func:`analyse_pair` read: the background and up to two objects, largest first."""

    background: str
    objects: list[ObjectReading]
    class_map: np.ndarray  # (H, W) uint8, 0 = background, 1 + shape index on each object

    def find(self, color: str) -> ObjectReading | None:
        """The (largest) object of ``color``, if any."""
        return next((item for item in self.objects if item.color == color), None)


def nearest_color(rgb: np.ndarray | tuple[float, float, float]) -> str:
    """The name of the named colour nearest (Euclidean RGB) to ``rgb``."""
    distances = np.linalg.norm(_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    return _NAMES[int(distances.argmin())]


def nearest_color_map(pixels: np.ndarray) -> np.ndarray:
    """(H, W) indices into ``tuple(COLORS)`` of the named colour nearest to each pixel of (H, W, 3)."""
    flat = pixels.reshape(-1, 1, 3).astype(np.float32)
    return ((flat - _RGB[None]) ** 2).sum(axis=2).argmin(axis=1).reshape(pixels.shape[:2])


def colour_share(image: Image.Image, region: np.ndarray, colour: str) -> float:
    """Share of ``region``'s pixels (an (H, W) bool mask) whose nearest named colour is ``colour``."""
    names = nearest_color_map(np.asarray(image.convert("RGB"), dtype=np.float32))
    return float((names[region] == _NAMES.index(colour)).mean())


@dataclass
class _Frame:
    """What both readers start from: the pixels, a median-filtered copy, the background's colour
    (``reference``, measured on the border) and name, the scale against 64x64 and the first pass's
    distance threshold."""

    pixels: np.ndarray
    smooth: np.ndarray
    reference: np.ndarray
    background: str
    scale: float
    threshold: float

    @property
    def far(self) -> np.ndarray:
        """The first pass: pixels of the filtered copy far enough from the background."""
        return np.linalg.norm(self.smooth - self.reference, axis=2) > self.threshold


def _frame(image: Image.Image) -> _Frame:
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.float32)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    reference = np.median(border, axis=0)
    background = nearest_color(reference)
    named = np.asarray(COLORS[background], dtype=np.float32)
    gap = min(float(np.linalg.norm(_RGB[i] - named)) for i, name in enumerate(_NAMES) if name != background)
    return _Frame(
        pixels=pixels,
        smooth=np.asarray(rgb.filter(ImageFilter.MedianFilter(3)), dtype=np.float32),
        reference=reference,
        background=background,
        scale=math.sqrt(height * width) / SIZE,
        threshold=min(max(gap / 2, 30.0), 60.0),
    )


def _second_pass(frame: _Frame, mask: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """``mask`` cut again at the midpoint between the background and the object's own colour, so
    that a soft (blurred) edge is cut where it is half object, half background (``within``: only
    pixels there may join)."""
    axis = _object_color(frame.pixels, mask, frame.reference) - frame.reference
    length = float(np.dot(axis, axis))
    if length <= frame.threshold * frame.threshold:
        return mask
    share = ((frame.pixels - frame.reference) @ axis) / length
    near = _dilate(((frame.smooth - frame.reference) @ axis) / length > 0.5)
    if within is not None:
        near &= within
    return largest_component(fill_holes((share > 0.5) & near))


def analyse(image: Image.Image) -> Analysis:
    """Read the scene in ``image`` (any size; square images read best). See the module docstring."""
    frame = _frame(image)
    pixels, reference, background, scale = frame.pixels, frame.reference, frame.background, frame.scale
    height, width = pixels.shape[:2]
    empty = Analysis(
        background,
        None,
        None,
        None,
        None,
        np.zeros((height, width), dtype=bool),
        np.zeros((height, width), dtype=np.uint8),
    )

    # first pass, on a median-filtered copy (speckle removed): far enough from the background
    mask = largest_component(fill_holes(frame.far))
    if not mask.any():
        return empty
    mask = _second_pass(frame, mask)

    area = int(mask.sum())
    if area < _MIN_AREA * scale * scale:
        return empty
    color = nearest_color(_object_color(pixels, mask, reference))

    shape = _shape(mask)
    radius = math.sqrt(area / _AREA_FACTOR[shape]) / scale
    size = min(SIZES, key=lambda name: abs(math.log(radius / SIZES[name])))

    ys, xs = np.nonzero(mask)
    cx = float(xs.mean()) + 0.5
    cy = float(ys.mean()) + 0.5 - _CENTROID_DROP.get(shape, 0.0) * radius * scale
    position = grid_position(cx / width, cy / height)

    class_map = np.where(mask, 1 + SHAPES.index(shape), 0).astype(np.uint8)
    return Analysis(background, color, shape, size, position, mask, class_map)


def analyse_pair(image: Image.Image) -> PairAnalysis:
    """Read a scene of up to two shapes (see the module docstring)."""
    frame = _frame(image)
    height, width = frame.pixels.shape[:2]
    least = _MIN_AREA * frame.scale * frame.scale
    labels, count = label_components(fill_holes(frame.far))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    parts = [labels == 1 + int(i) for i in np.argsort(-areas, kind="stable") if areas[i] >= least][:2]
    if len(parts) == 1:
        parts = _split_by_colour(parts[0], frame.smooth, frame.background, least)
    objects = [reading for part in parts if (reading := _read_object(frame, part, least)) is not None]
    objects.sort(key=lambda item: -int(item.mask.sum()))
    class_map = np.zeros((height, width), dtype=np.uint8)
    for item in reversed(objects):  # the larger one wins where two overlap
        class_map[item.mask] = 1 + SHAPES.index(item.shape)
    return PairAnalysis(frame.background, objects, class_map)


def _split_by_colour(part: np.ndarray, smooth: np.ndarray, background: str, least: float) -> list[np.ndarray]:
    """``part`` as two objects when two named colours each cover a good share of it (two shapes
    that touch), else as one. The rim between a shape and the background blends their colours into
    a third; it is thin, so the second colour must cover a fifth of the part and a least area."""
    names = nearest_color_map(smooth)
    counts = np.bincount(names[part], minlength=len(_NAMES))
    counts[_NAMES.index(background)] = 0
    first, second = (int(i) for i in np.argsort(-counts, kind="stable")[:2])
    if counts[second] < max(least, 0.2 * part.sum()):
        return [part]
    return [largest_component(fill_holes(part & (names == index))) for index in (first, second)]


def _read_object(frame: _Frame, part: np.ndarray, least: float) -> ObjectReading | None:
    """One object of :func:`analyse_pair`, from its first-pass ``part``: the second pass as in
    :func:`analyse`, limited to two pixels around ``part``."""
    height, width = part.shape
    mask = _second_pass(frame, part, within=_dilate(_dilate(part)))
    area = int(mask.sum())
    if area < least:
        return None
    shape = _shape(mask)
    radius = math.sqrt(area / _AREA_FACTOR[shape]) / frame.scale
    ys, xs = np.nonzero(mask)
    cx = (float(xs.mean()) + 0.5) / width
    cy = (float(ys.mean()) + 0.5 - _CENTROID_DROP.get(shape, 0.0) * radius * frame.scale) / height
    return ObjectReading(
        color=nearest_color(_object_color(frame.pixels, mask, frame.reference)),
        shape=shape,
        size=min(SIZES, key=lambda name: abs(math.log(radius / SIZES[name]))),
        position=grid_position(cx, cy),
        center=(cx, cy),
        mask=mask,
    )


def relation(first: ObjectReading, second: ObjectReading) -> str:
    """Where ``first`` is, seen from ``second``: "left of", "right of", "above" or "below", by the
    larger of the two offsets between their anchors."""
    dx = first.center[0] - second.center[0]
    dy = first.center[1] - second.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def grid_position(fx: float, fy: float) -> str:
    """The position name of the 3x3 grid cell holding the point (``fx``, ``fy``), in image fractions:
    along each axis, the nearest anchor coordinate of :data:`~training.shapes.POSITIONS`."""
    xs = sorted({anchor[0] for anchor in POSITIONS.values()})
    ys = sorted({anchor[1] for anchor in POSITIONS.values()})
    ax = min(xs, key=lambda v: abs(v - fx))
    ay = min(ys, key=lambda v: abs(v - fy))
    return next(name for name, anchor in POSITIONS.items() if anchor == (ax, ay))


def _object_color(pixels: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The median of the object's more object-like half: its pixels farthest from the background
    (the core of a blurred or anti-aliased shape rather than its edge)."""
    inside = pixels[mask]
    distance = np.linalg.norm(inside - reference, axis=1)
    return np.median(inside[distance >= np.median(distance)], axis=0)


def _core_box(mask: np.ndarray) -> np.ndarray:
    """The mask inside its bounding box, less end rows and columns under a fifth of the widest (a
    stray pixel on an edge would otherwise stretch the box)."""
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    keep_rows = np.nonzero(rows >= max(rows.max() / 5, 1))[0]
    keep_cols = np.nonzero(cols >= max(cols.max() / 5, 1))[0]
    return mask[keep_rows[0] : keep_rows[-1] + 1, keep_cols[0] : keep_cols[-1] + 1]


def _shape(mask: np.ndarray) -> str:
    box = _core_box(mask)
    fill = float(box.mean())
    widths = box.sum(axis=1).astype(np.float32)
    quarter = max(1, len(widths) // 4)
    taper = float(widths[:quarter].mean()) / max(float(widths[-quarter:].mean()), 1.0)
    if taper < 0.57:  # triangles measure 0.25-0.41 here, circles and squares 0.73 or more
        return "triangle"
    return "square" if fill > 0.9 else "circle"  # squares fill 0.94-1.0 of the box, circles 0.75-0.86


def class_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean intersection-over-union of two (H, W) class maps, over the classes present in either."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if truth.shape != predicted.shape:
        raise ValueError(f"class maps differ in shape: {truth.shape} vs {predicted.shape}")
    scores = []
    for cls in np.union1d(np.unique(truth), np.unique(predicted)):
        a, b = truth == cls, predicted == cls
        scores.append(float((a & b).sum()) / float((a | b).sum()))
    return float(np.mean(scores))


# -- binary morphology without extra dependencies -----------------------------------------------


def _shifted(mask: np.ndarray, dy: int, dx: int, fill: bool) -> np.ndarray:
    out = np.full_like(mask, fill)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in the eight directions."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out |= _shifted(mask, dy, dx, False)
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are in it too."""
    out = mask.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        out &= _shifted(mask, dy, dx, False)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus the pixels that the outside cannot reach (4-connected) without crossing it."""
    mask = np.asarray(mask, dtype=bool)
    free = ~mask
    outside = np.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    while True:
        grown = outside.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            grown |= _shifted(outside, dy, dx, False)
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of ``mask``: an (H, W) int32 label array (0 = not in mask) and their count."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        stack = [(int(y), int(x))]
        while stack:
            cy, cx = stack.pop()
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels, count


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (the first one found on a tie)."""
    labels, count = label_components(mask)
    if count == 0:
        return np.zeros(labels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(sizes.argmax())
