"""Edge maps for edges ControlNets, in numpy and Pillow only.

Canny and scribble ControlNets are trained on white lines on black. Two sources give such lines:

* a **sketch** (lines drawn on the canvas, or an uploaded line drawing) is used as it is, after
  turning dark lines on a light background into light lines on a dark one (:func:`line_map`);
* a **photo** goes through a small Canny detector (:func:`canny`): Gaussian blur, Sobel gradients,
  non-maximum suppression (one-pixel-wide edges) and hysteresis between two thresholds.

:func:`edge_map` merges both at the output size: a pixel is a line where it is one in either.

Every step is linear in the number of pixels. The blur, the gradients and the suppression are a
fixed number of whole-array operations; hysteresis (:func:`hysteresis`) follows weak edges from
strong ones in at most :data:`MAX_SWEEPS` top-down and bottom-up sweeps over the rows, instead of a
flood fill whose depth could be the whole image. The images are first resized to the output size,
which the host's limits bound.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["BLANK_LEVELS", "INVERT_CHOICES", "MAX_SWEEPS", "canny", "edge_map", "hysteresis", "line_map"]

INVERT_CHOICES: tuple[str, ...] = ("auto", "always", "never")
BLANK_LEVELS = 16  # a sketch whose lines stand out from its background by less than this is blank
MAX_SWEEPS = 8  # hysteresis sweeps: follows a weak edge that turns back up or down up to 6 times
_SIGMA = 1.4  # the Gaussian blur before the gradients (Canny's usual 5×5 kernel)
_TAN_22_5 = math.tan(math.radians(22.5))
_TIE = 1e-3  # magnitudes closer than this are equal (float32 noise breaks a clean step's symmetry)


def line_map(sketch: Image.Image, invert: str = "auto") -> np.ndarray:
    """The lines of ``sketch`` as a uint8 array, light lines on black.

    ``invert``: ``"always"`` (black lines on white paper), ``"never"`` (light lines on a dark
    background already), or ``"auto"``: invert when the background (the median grey level, since a
    drawing is mostly background) is light. The background level then becomes black and the
    strongest line white, so a scan on grey paper gives the same map as a clean drawing. A sketch
    whose lines stand out from its background by less than :data:`BLANK_LEVELS` grey levels (an
    empty canvas) gives all zeros.
    """
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    gray = np.asarray(sketch.convert("L"), dtype=np.float32)
    if invert == "always" or (invert == "auto" and float(np.median(gray)) > 127.5):
        gray = 255.0 - gray
    background, peak = float(np.median(gray)), float(gray.max())
    if peak - background < BLANK_LEVELS:
        return np.zeros(gray.shape, dtype=np.uint8)
    lines = (gray - background) * (255.0 / (peak - background))
    return np.clip(np.rint(lines), 0, 255).astype(np.uint8)


def canny(photo: Image.Image, low: float, high: float) -> np.ndarray:
    """The edges of ``photo`` as a uint8 array: 255 on one-pixel-wide edges, 0 elsewhere.

    ``low`` and ``high`` are thresholds on the Sobel gradient magnitude of the blurred 0..255
    luminance (the scale of OpenCV's ``Canny`` and of AUTOMATIC1111's canny preprocessor, whose
    defaults are 100 and 200): an edge pixel above ``high`` is kept, one above ``low`` is kept when
    it is connected to one above ``high`` (see :func:`hysteresis`).
    """
    if low > high:
        raise ValueError(f"the low threshold {low:g} is above the high threshold {high:g}")
    gray = np.asarray(photo.convert("L"), dtype=np.float32)
    gx, gy = _sobel(_gaussian_blur(gray, _SIGMA))
    magnitude = _thin(np.hypot(gx, gy), gx, gy)
    kept = hysteresis(magnitude > low, magnitude > high)
    return np.where(kept, 255, 0).astype(np.uint8)


def hysteresis(weak: np.ndarray, strong: np.ndarray, max_sweeps: int = MAX_SWEEPS) -> np.ndarray:
    """The pixels of ``weak`` that are 8-connected through ``weak`` to a pixel of ``strong``
    (``strong`` is taken as part of ``weak``), as a bool array.

    Sweeps the rows top-down, then bottom-up, and so on, until nothing changes or after
    ``max_sweeps`` sweeps. In one sweep a row takes in the weak pixels touching a kept pixel of the
    row before it (diagonals included), then every run of adjacent weak pixels in the row that holds
    a kept pixel. So one sweep follows any edge that runs sideways and in the sweep's direction; an
    edge that turns back (down, then up) needs one sweep more per turn. Each sweep costs one pass
    over the pixels, so the whole is linear; an edge with more than ``max_sweeps - 2`` turns (a
    contrived spiral, not a photo's edge) may be cut where the sweeps end.
    """
    weak, strong = np.asarray(weak, dtype=bool), np.asarray(strong, dtype=bool)
    if weak.ndim != 2 or weak.shape != strong.shape:
        raise ValueError("weak and strong must be 2-D arrays of one shape")
    kept, weak = strong.copy(), weak | strong
    height = kept.shape[0]
    for sweep in range(max(1, max_sweeps)):
        changed = False
        rows = range(height) if sweep % 2 == 0 else range(height - 1, -1, -1)
        previous: np.ndarray | None = None
        for y in rows:
            row = kept[y]
            candidates = weak[y] & ~row
            if candidates.any() and (row.any() or (previous is not None and previous.any())):
                grown = row.copy()
                if previous is not None:
                    touching = previous.copy()
                    touching[1:] |= previous[:-1]
                    touching[:-1] |= previous[1:]
                    grown |= touching & candidates
                grown = _whole_runs(grown, weak[y])
                if (grown != row).any():
                    kept[y] = row = grown
                    changed = True
            previous = row
        if not changed and sweep > 0:  # stable both ways: the last two sweeps went opposite ways
            break
    return kept


def edge_map(
    width: int,
    height: int,
    *,
    sketch: Image.Image | None = None,
    photo: Image.Image | None = None,
    low: float = 100,
    high: float = 200,
    invert: str = "auto",
) -> Image.Image:
    """The ControlNet's conditioning image, an "L" image of ``width``×``height``: the sketch's
    lines (:func:`line_map`) and the photo's edges (:func:`canny`) merged (the lighter of the two
    per pixel). Both images are stretched to the output size first, as ControlNet tools' "just
    resize" does; either may be ``None``."""
    merged = np.zeros((height, width), dtype=np.uint8)
    if sketch is not None:
        merged = np.maximum(merged, line_map(_resized(sketch, width, height), invert))
    if photo is not None:
        merged = np.maximum(merged, canny(_resized(photo, width, height), low, high))
    return Image.fromarray(merged, "L")


# -- the steps -------------------------------------------------------------------------------


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    gray = image.convert("L")
    return gray if gray.size == (width, height) else gray.resize((width, height), Image.Resampling.BILINEAR)


def _gaussian_blur(gray: np.ndarray, sigma: float) -> np.ndarray:
    """A separable 5×5 Gaussian blur; the border pixels are repeated outwards."""
    taps = np.exp(-(np.arange(-2, 3, dtype=np.float32) ** 2) / (2 * sigma * sigma))
    taps /= taps.sum()
    height, width = gray.shape
    padded = np.pad(gray, 2, mode="edge")
    across = sum(taps[i] * padded[:, i : i + width] for i in range(5))
    return sum(taps[i] * across[i : i + height, :] for i in range(5))


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3×3 Sobel gradients (x to the right, y downwards); the border pixels are repeated."""
    height, width = image.shape
    p = np.pad(image, 1, mode="edge")
    left, right = p[:, :width], p[:, 2:]
    top, bottom = p[:height], p[2:]
    smooth_y = lambda columns: columns[:height] + 2 * columns[1 : height + 1] + columns[2:]  # noqa: E731
    smooth_x = lambda rows: rows[:, :width] + 2 * rows[:, 1 : width + 1] + rows[:, 2:]  # noqa: E731
    return smooth_y(right) - smooth_y(left), smooth_x(bottom) - smooth_x(top)


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: the magnitude where it is a maximum across the edge (along the
    gradient, rounded to 0°, 45°, 90° or 135°), else 0. Of two equal neighbours across a step, the
    one before it (left or above) is kept, so edges are one pixel wide; magnitudes within
    :data:`_TIE` of each other count as equal, so a step's two equal slopes are not split by float
    rounding."""
    height, width = magnitude.shape
    p = np.pad(magnitude, 1)
    at = lambda dy, dx: p[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]  # noqa: E731
    ax, ay = np.abs(gx), np.abs(gy)
    across = ay <= _TAN_22_5 * ax  # the gradient is horizontal: a vertical edge
    along = ax <= _TAN_22_5 * ay  # the gradient is vertical: a horizontal edge
    falling = (gx * gy) > 0  # the gradient points down-right or up-left
    before = np.where(across, at(0, -1), np.where(along, at(-1, 0), np.where(falling, at(-1, -1), at(-1, 1))))
    after = np.where(across, at(0, 1), np.where(along, at(1, 0), np.where(falling, at(1, 1), at(1, -1))))
    peak = (magnitude > before + _TIE) & (magnitude >= after - _TIE)
    return np.where(peak, magnitude, 0).astype(np.float32)


def _whole_runs(kept: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """``kept`` (one row) grown to every run of adjacent ``weak`` pixels that holds a kept pixel."""
    starts = weak & ~np.concatenate(([False], weak[:-1]))
    run = np.cumsum(starts)  # the run number of each pixel (meaningful where weak)
    runs_kept = np.zeros(int(run[-1]) + 1 if run.size else 1, dtype=bool)
    runs_kept[run[kept & weak]] = True
    return kept | (weak & runs_kept[run])
