"""The ADE20K palette, palette files, snapping to a palette and the ControlNet conditioning tensor."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.segmap import (
    ADE20K,
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    Palette,
    control_image_tensor,
    render_class_map,
    snap_to_palette,
)
from webui.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError

WALL, BUILDING, SKY, FLOOR, TREE, ROAD, SKYSCRAPER = 0, 1, 2, 3, 4, 6, 48


def _random_class_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(ADE20K_CLASSES), (height, width))


def _unambiguous(class_map: np.ndarray) -> np.ndarray:
    """``class_map`` with "skyscraper" (which shares road's colour) replaced by "road"."""
    return np.where(class_map == SKYSCRAPER, ROAD, class_map)


# --- the palette ---------------------------------------------------------------------------------


def test_ade20k_palette_shape_and_known_entries():
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_PALETTE[:5].tolist() == [
        [120, 120, 120],
        [180, 120, 120],
        [6, 230, 230],
        [80, 50, 50],
        [4, 200, 3],
    ]
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[-1] == "flag" and ADE20K_PALETTE[-1].tolist() == [92, 0, 255]
    assert ADE20K_CLASSES[12] == "person" and ADE20K_PALETTE[12].tolist() == [150, 5, 61]
    assert all(name == name.strip() for name in ADE20K_CLASSES)


def test_ade20k_colours_are_distinct_except_road_and_skyscraper():
    # The published palette the ControlNet was trained on draws road and skyscraper alike.
    assert ADE20K_CLASSES[ROAD] == "road" and ADE20K_CLASSES[SKYSCRAPER] == "skyscraper"
    assert ADE20K_PALETTE[ROAD].tolist() == ADE20K_PALETTE[SKYSCRAPER].tolist() == [140, 140, 140]
    unique, counts = np.unique(ADE20K_PALETTE, axis=0, return_counts=True)
    assert len(unique) == 149
    assert unique[counts > 1].tolist() == [[140, 140, 140]]
    others = np.delete(ADE20K_PALETTE, SKYSCRAPER, axis=0)
    assert len(np.unique(others, axis=0)) == 149


def test_ade20k_palette_is_read_only():
    with pytest.raises(ValueError):
        ADE20K_PALETTE[0, 0] = 1
    with pytest.raises(ValueError):
        ADE20K.colors[0, 0] = 1


def test_ade20k_instance():
    assert ADE20K.name == "ade20k" and len(ADE20K) == 150
    assert ADE20K.classes == ADE20K_CLASSES
    assert np.array_equal(ADE20K.colors, ADE20K_PALETTE)
    assert ADE20K.index("sky") == SKY and ADE20K.color("tree") == (4, 200, 3)
    with pytest.raises(KeyError):
        ADE20K.index("unicorn")


def test_palette_validation():
    with pytest.raises(ValueError, match="class names"):
        Palette("p", ("a",), np.array([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="0 and 255"):
        Palette("p", ("a",), np.array([[0, 0, 256]]))
    with pytest.raises(ValueError, match="shape"):
        Palette("p", ("a",), np.array([0, 0, 0]))


def test_palette_equality_and_hash():
    a = Palette("p", ("x", "y"), np.array([[1, 2, 3], [4, 5, 6]]))
    b = Palette("p", ("x", "y"), [[1, 2, 3], [4, 5, 6]])
    c = Palette("p", ("x", "y"), [[1, 2, 3], [4, 5, 7]])
    assert a == b and hash(a) == hash(b) and a != c
    assert {a, b, c} == {a, c}


def test_palette_json_round_trip(tmp_path):
    path = tmp_path / "palette.json"
    ADE20K.to_json(path)
    data = json.loads(path.read_text())
    assert data["name"] == "ade20k" and len(data["classes"]) == 150
    assert data["colors"][2] == [6, 230, 230]
    loaded = Palette.from_json(path)
    assert loaded == ADE20K

    custom = Palette(
        "city", ("road", "car", "person"), np.array([[128, 64, 128], [0, 0, 142], [220, 20, 60]])
    )
    (tmp_path / "city").mkdir()
    custom.to_json(tmp_path / "city" / "palette.json")
    assert Palette.from_json(tmp_path / "city" / "palette.json") == custom


def test_palette_json_defaults_and_errors(tmp_path):
    net = tmp_path / "my-controlnet"
    net.mkdir()
    path = net / "palette.json"
    path.write_text(json.dumps({"colors": [[0, 0, 0], [255, 255, 255]]}))
    pal = Palette.from_json(path)
    assert pal.name == "my-controlnet" and pal.classes == ("class 0", "class 1")

    with pytest.raises(ModelNotFoundError):
        Palette.from_json(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="palette"):
        Palette.from_json(path)
    path.write_text(json.dumps({"classes": ["a"], "colors": [[0, 0]]}))
    with pytest.raises(ModelLoadError, match="colors"):
        Palette.from_json(path)
    path.write_text(json.dumps({"classes": ["a", "b"], "colors": [[0, 0, 0]]}))
    with pytest.raises(ModelLoadError, match="class names"):
        Palette.from_json(path)


# --- snapping --------------------------------------------------------------------------------------


def test_exact_palette_colours_map_to_themselves():
    class_map = _unambiguous(_random_class_map(40, 60))
    image = Image.fromarray(ADE20K_PALETTE[class_map])
    snapped, found, off = snap_to_palette(image, ADE20K)
    assert off == 0
    assert found.shape == (40, 60) and np.issubdtype(found.dtype, np.integer)
    assert np.array_equal(found, class_map)
    assert np.array_equal(np.asarray(snapped), np.asarray(image))


def test_every_palette_colour_maps_to_its_own_class():
    image = Image.fromarray(ADE20K_PALETTE[None])  # 1 x 150
    _snapped, found, off = snap_to_palette(image)
    assert off == 0
    assert np.array_equal(found[0], _unambiguous(np.arange(150)))


def test_off_palette_colour_maps_to_nearest_class_and_is_counted():
    arr = np.empty((4, 5, 3), dtype=np.uint8)
    arr[:] = ADE20K_PALETTE[SKY]
    arr[0, 0] = ADE20K_PALETTE[WALL] + 3  # (123, 123, 123): nearest is wall
    arr[1, 1] = ADE20K_PALETTE[WALL] + 3
    arr[2, 2] = (6, 197, 4)  # tree is (4, 200, 3)
    arr[3, 4] = ADE20K_PALETTE[FLOOR]
    snapped, found, off = snap_to_palette(Image.fromarray(arr), ADE20K)
    assert off == 3
    assert found[0, 0] == WALL and found[1, 1] == WALL and found[2, 2] == TREE
    assert found[3, 4] == FLOOR and found[0, 1] == SKY
    px = np.asarray(snapped)
    assert px[0, 0].tolist() == [120, 120, 120] and px[2, 2].tolist() == [4, 200, 3]
    assert set(map(tuple, px.reshape(-1, 3).tolist())) <= set(map(tuple, ADE20K_PALETTE.tolist()))


def test_snap_matches_brute_force_nearest_colour():
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _snapped, found, off = snap_to_palette(Image.fromarray(arr))
    flat = arr.reshape(-1, 3).astype(np.int64)
    dist = ((flat[:, None, :] - ADE20K_PALETTE[None].astype(np.int64)) ** 2).sum(-1)
    assert np.array_equal(found.reshape(-1), dist.argmin(axis=1))
    assert off == int((dist.min(axis=1) > 0).sum())


def test_snap_accepts_a_plain_colour_array_and_breaks_ties_to_the_lower_index():
    colors = np.array([[0, 0, 0], [10, 0, 0]], dtype=np.uint8)
    arr = np.array([[[5, 0, 0], [9, 0, 0], [0, 0, 0]]], dtype=np.uint8)
    snapped, found, off = snap_to_palette(Image.fromarray(arr), colors)
    assert found.tolist() == [[0, 1, 0]] and off == 2
    assert np.asarray(snapped).tolist() == [[[0, 0, 0], [10, 0, 0], [0, 0, 0]]]


def test_snap_large_noisy_map_is_fast_and_correct():
    class_map = _unambiguous(_random_class_map(2048, 2048, seed=3))
    clean = ADE20K_PALETTE[class_map]
    rng = np.random.default_rng(4)
    noise = rng.integers(-2, 3, clean.shape)
    noisy = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    start = time.perf_counter()
    _snapped, found, off = snap_to_palette(Image.fromarray(noisy))
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    assert off == int((noisy != clean).any(axis=-1).sum())
    # +-2 per channel is far less than half the gap between almost all palette colours
    assert (found == class_map).mean() > 0.99


def test_snap_converts_other_modes():
    gray = Image.new("L", (3, 3), 120)  # grey 120 is exactly the wall colour
    _snapped, found, off = snap_to_palette(gray)
    assert off == 0 and (found == WALL).all()


# --- rendering -------------------------------------------------------------------------------------


def test_render_class_map_round_trip():
    class_map = _unambiguous(_random_class_map(33, 47, seed=9))
    image = render_class_map(class_map, ADE20K)
    assert image.mode == "RGB" and image.size == (47, 33)
    assert np.array_equal(np.asarray(image), ADE20K_PALETTE[class_map])
    _snapped, found, off = snap_to_palette(image, ADE20K)
    assert off == 0 and np.array_equal(found, class_map)


def test_render_class_map_refuses_bad_input():
    with pytest.raises(InvalidRequestError, match="class indices"):
        render_class_map(np.array([[0, 150]]))
    with pytest.raises(InvalidRequestError, match="class indices"):
        render_class_map(np.array([[-1, 0]]))
    with pytest.raises(InvalidRequestError, match="2-D"):
        render_class_map(np.zeros((2, 2, 2), dtype=int))
    with pytest.raises(InvalidRequestError, match="integer"):
        render_class_map(np.zeros((2, 2), dtype=float))


# --- conditioning tensor ---------------------------------------------------------------------------


def test_control_image_tensor_keeps_only_palette_colours_when_resized():
    class_map = np.zeros((30, 30), dtype=np.int64)
    class_map[:, 15:] = SKY
    class_map[10:20, 5:25] = TREE
    seg = render_class_map(class_map)
    t = control_image_tensor(seg, 64, 48)
    assert t.shape == (1, 3, 48, 64) and t.dtype == torch.float32
    assert t.min().item() >= 0.0 and t.max().item() <= 1.0
    px = (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    seen = {tuple(c) for c in px.reshape(-1, 3).tolist()}
    assert seen == {tuple(ADE20K_PALETTE[i].tolist()) for i in (WALL, SKY, TREE)}
    # the same resize with smoothing would invent colours that belong to no class
    blended = np.asarray(seg.resize((64, 48), Image.Resampling.BILINEAR))
    assert len({tuple(c) for c in blended.reshape(-1, 3).tolist()}) > 3


def test_control_image_tensor_without_resize_is_exact():
    arr = ADE20K_PALETTE[_random_class_map(16, 24)]
    t = control_image_tensor(Image.fromarray(arr), 24, 16)
    assert torch.equal(t[0], torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1))
