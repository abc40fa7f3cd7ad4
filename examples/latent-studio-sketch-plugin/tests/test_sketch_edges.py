"""The edge detector and the sketch reader (numpy and Pillow only, no model)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from latent_studio_sketch.edges import MAX_SWEEPS, canny, edge_map, hysteresis, line_map
from PIL import Image, ImageDraw

from webui.testing import sample_image


def square(size: int = 64, low: int = 16, high: int = 48, inside: int = 255, outside: int = 0) -> Image.Image:
    pixels = np.full((size, size), outside, dtype=np.uint8)
    pixels[low:high, low:high] = inside
    return Image.fromarray(pixels, "L")


def drawing(background: int = 255, ink: int = 0, size: int = 64) -> Image.Image:
    """Two strokes, a horizontal and a vertical one, on plain paper."""
    pixels = np.full((size, size), background, dtype=np.uint8)
    pixels[20:22, 10:54] = ink
    pixels[10:54, 30:32] = ink
    return Image.fromarray(pixels, "L")


def flood_fill(weak: np.ndarray, strong: np.ndarray, *, diagonals: bool = True) -> np.ndarray:
    """Exact hysteresis, for reference: a breadth-first fill from the strong pixels through the
    weak ones, 8-connected (4-connected without ``diagonals``)."""
    weak = weak | strong
    kept = strong.copy()
    queue = deque(zip(*np.nonzero(strong), strict=True))
    height, width = weak.shape
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if diagonals or not (dy and dx)]
    while queue:
        y, x = queue.popleft()
        for dy, dx in steps:
            v, u = y + dy, x + dx
            if 0 <= v < height and 0 <= u < width and weak[v, u] and not kept[v, u]:
                kept[v, u] = True
                queue.append((v, u))
    return kept


# --- canny ------------------------------------------------------------------------------------


def test_a_white_square_gives_one_pixel_edges_on_its_border_only():
    edges = canny(square(), 100, 200)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    # every edge pixel touches the square's border (between 15|16 and 47|48)...
    on_border = (np.isin(xs, (15, 16, 47, 48)) & (ys >= 15) & (ys <= 48)) | (
        np.isin(ys, (15, 16, 47, 48)) & (xs >= 15) & (xs <= 48)
    )
    assert on_border.all()
    # ...one pixel wide, the same way on every side (away from the rounded corners)...
    for k in range(20, 45):
        assert list(np.nonzero(edges[k])[0]) == [15, 47], k  # a row crosses the left and the right side
        assert list(np.nonzero(edges[:, k])[0]) == [15, 47], k  # a column crosses the top and the bottom
    assert not edges[17:46, 17:46].any() and not edges[:12].any() and not edges[52:].any()
    # ...and all the way round: the outside cannot reach the inside without crossing an edge
    start = np.zeros(edges.shape, dtype=bool)
    start[0, 0] = True
    outside = flood_fill(edges == 0, start, diagonals=False)
    assert outside[63, 63] and not outside[16:47, 16:47].any()


def test_black_on_white_and_white_on_black_have_the_same_edges():
    assert np.array_equal(canny(square(), 100, 200), canny(square(inside=0, outside=255), 100, 200))


def step(contrast: np.ndarray) -> Image.Image:
    """A horizontal step between rows 31 and 32, ``contrast[x]`` grey levels high in column x."""
    pixels = np.zeros((64, 64), dtype=np.float32)
    pixels[32:] = contrast
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def test_weak_edges_are_kept_only_where_they_continue_a_strong_one():
    # a step of 60 grey levels: its gradient (about 130) lies between the thresholds
    weak_only = step(np.full(64, 60.0))
    assert not canny(weak_only, 100, 200).any()  # no strong pixel to start from
    assert not canny(weak_only, 40, 200).any()
    assert np.nonzero(canny(weak_only, 40, 100))[0].tolist() == [31] * 64  # all strong: the whole line

    fading = step(np.linspace(255, 60, 64))  # the same line, strong on the left, weak on the right
    rows, columns = np.nonzero(canny(fading, 100, 200))
    assert columns.tolist() == list(range(64)) and set(rows.tolist()) <= {31, 32}  # strong end to weak end
    fading_out = step(np.linspace(255, 30, 64))  # weaker than the low threshold at the right end
    kept = np.nonzero(canny(fading_out, 100, 200).any(axis=0))[0]
    assert 40 < len(kept) < 64 and np.array_equal(kept, np.arange(len(kept)))  # up to where it fades out


def test_a_flat_or_smooth_image_has_no_edges():
    assert not canny(Image.new("L", (40, 30), 128), 1, 1).any()
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    assert not canny(Image.fromarray(ramp), 100, 200).any()  # a gentle slope is no edge


def test_thresholds_in_the_wrong_order_are_refused():
    with pytest.raises(ValueError, match="low threshold 200 is above the high threshold 100"):
        canny(square(), 200, 100)


# --- hysteresis -------------------------------------------------------------------------------


def snake(columns: int, height: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A one-pixel weak path down column 1, across the bottom to column 3, up it, across the top to
    column 5... (it turns back ``columns - 1`` times), strong only at its start (top of column 1)."""
    weak = np.zeros((height, 2 * columns + 2), dtype=bool)
    for c in range(columns):
        x = 1 + 2 * c
        weak[1 : height - 1, x] = True
        if c + 1 < columns:
            y = height - 2 if c % 2 == 0 else 1
            weak[y, x : x + 3] = True
    strong = np.zeros_like(weak)
    strong[1, 1] = True
    return weak, strong


def test_hysteresis_follows_an_edge_through_every_turn_within_the_sweeps():
    weak, strong = snake(MAX_SWEEPS)
    assert np.array_equal(hysteresis(weak, strong), weak)  # a sweep per direction of travel
    assert np.array_equal(hysteresis(weak, strong), flood_fill(weak, strong))


def test_hysteresis_is_bounded_by_its_sweeps():
    """The bound that keeps it linear: after max_sweeps passes over the rows it stops, even where a
    contrived edge keeps turning back."""
    weak, strong = snake(5)
    assert np.array_equal(hysteresis(weak, strong, max_sweeps=5), weak)
    cut = hysteresis(weak, strong, max_sweeps=3)
    assert np.array_equal(cut[:, :7], weak[:, :7])  # the first three columns and their joints
    assert np.nonzero(cut[:, 7:])[0].tolist() == [10]  # the fourth column: only the joint at its foot


def test_hysteresis_matches_an_exact_flood_fill_on_a_photos_edges():
    from latent_studio_sketch import edges as module

    photo = sample_image(96, 80, seed=3)  # a noisy gradient, with a disc, a box and a line on it
    draw = ImageDraw.Draw(photo)
    draw.ellipse((10, 10, 50, 60), fill=(230, 230, 230))
    draw.rectangle((55, 20, 90, 70), fill=(90, 60, 40))
    draw.line((0, 75, 95, 5), fill=(200, 0, 0), width=2)
    gray = np.asarray(photo.convert("L"), dtype=np.float32)
    gx, gy = module._sobel(module._gaussian_blur(gray, 1.4))
    magnitude = module._thin(np.hypot(gx, gy), gx, gy)
    for low, high in ((20, 60), (40, 120), (60, 200)):
        weak, strong = magnitude > low, magnitude > high
        kept = hysteresis(weak, strong)
        assert np.array_equal(kept, flood_fill(weak, strong)), (low, high)
        assert strong.sum() < kept.sum() < weak.sum()  # the thresholds mattered both ways


def test_hysteresis_drops_weak_pixels_that_touch_no_strong_one():
    weak = np.zeros((9, 9), dtype=bool)
    weak[2, 1:8] = weak[6, 1:8] = True
    strong = np.zeros_like(weak)
    strong[2, 4] = True
    kept = hysteresis(weak, strong)
    assert kept[2, 1:8].all() and not kept[6].any()
    with pytest.raises(ValueError, match="one shape"):
        hysteresis(weak, strong[:5])


# --- the sketch -------------------------------------------------------------------------------


def test_dark_lines_on_light_paper_are_inverted_to_white_on_black():
    lines = line_map(drawing(), "auto")
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[20:22, 10:54] = expected[10:54, 30:32] = 255
    assert np.array_equal(lines, expected)
    assert np.array_equal(line_map(drawing(), "always"), expected)
    assert np.array_equal(line_map(drawing(background=0, ink=255), "auto"), expected)  # already right
    assert np.array_equal(line_map(drawing(background=0, ink=255), "never"), expected)
    # told not to invert, dark lines on light paper are no light lines at all
    assert not line_map(drawing(), "never").any()


def test_a_scan_on_grey_paper_reads_like_a_clean_drawing():
    scan = np.asarray(drawing(background=205, ink=45), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-3, 4, scan.shape)
    lines = line_map(Image.fromarray(np.clip(scan + noise, 0, 255).astype(np.uint8)), "auto")
    clean = line_map(drawing(), "auto")
    assert np.abs(lines.astype(np.int16) - clean).max() <= 12  # the paper's grain stays near black


def test_an_empty_canvas_has_no_lines():
    assert not line_map(Image.new("RGB", (32, 32), "white"), "auto").any()
    faint = np.full((32, 32), 250, dtype=np.uint8)
    faint[10, :] = 245  # a smudge, not a line
    assert not line_map(Image.fromarray(faint), "auto").any()
    with pytest.raises(ValueError, match="invert must be one of auto, always, never"):
        line_map(drawing(), "sideways")


def test_the_edge_map_merges_the_sketch_and_the_photos_edges_at_the_output_size():
    photo = square(128, 32, 96)  # twice the output size: its edges are found after resizing
    sketch = drawing(size=32)  # half the output size: strokes in rows 20-21 and columns 30-31
    both = np.asarray(edge_map(64, 64, sketch=sketch, photo=photo))
    lines = np.asarray(edge_map(64, 64, sketch=sketch))
    edges = np.asarray(edge_map(64, 64, photo=photo))
    assert both.shape == lines.shape == edges.shape == (64, 64)
    assert np.array_equal(both, np.maximum(lines, edges))
    for k in range(20, 45):  # the square's border, scaled down
        assert np.isin(np.nonzero(edges[k])[0], (15, 16, 47, 48)).sum() == 2 == (edges[k] > 0).sum()
    assert lines[41:43, 21:].min() == 255 and lines[21:, 61:63].min() == 255  # the strokes, scaled up
    assert not lines[:19].any() and not lines[:39, :59].any()
    assert lines.max() == 255 and edges.max() == 255
    assert (both > 0).sum() > max((lines > 0).sum(), (edges > 0).sum())
    assert not np.asarray(edge_map(48, 40)).any() and edge_map(48, 40).size == (48, 40)
