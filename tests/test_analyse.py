"""The scene analyser reads back what the renderer drew, also through noise and blur."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from training.analyse import (
    analyse,
    class_iou,
    fill_holes,
    grid_position,
    label_components,
    largest_component,
    nearest_color,
)
from training.shapes import COLORS, POSITIONS, Scene, random_scene

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

ATTRIBUTES = ("background", "color", "shape", "size", "position")
COUNT = 500


def _perturbed(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild Gaussian noise (sigma 8 per channel) and a slight blur."""
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 8.0, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.8)
    )


def _score(scenes_seed: int, perturb: bool) -> tuple[dict[str, float], float, list[str]]:
    rng = random.Random(scenes_seed)
    noise = np.random.default_rng(scenes_seed)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    ious: list[float] = []
    misses: list[str] = []
    for _ in range(COUNT):
        scene = random_scene(rng)
        image, labels = scene.render()
        if perturb:
            image = _perturbed(image, noise)
        found = analyse(image)
        for name in ATTRIBUTES:
            if getattr(found, name) == getattr(scene, name):
                hits[name] += 1
            elif len(misses) < 10:
                misses.append(f"{name}: read {getattr(found, name)!r} from {scene}")
        ious.append(class_iou(labels, found.class_map))
    return {name: hits[name] / COUNT for name in ATTRIBUTES}, float(np.mean(ious)), misses


def test_reads_back_clean_renders():
    accuracy, iou, misses = _score(20240, perturb=False)
    assert all(value >= 0.99 for value in accuracy.values()), (accuracy, misses)
    assert iou >= 0.95, iou


def test_reads_back_noisy_blurred_renders():
    accuracy, iou, misses = _score(777, perturb=True)
    assert all(value >= 0.95 for value in accuracy.values()), (accuracy, misses)
    assert iou >= 0.95, iou


def test_class_map_matches_the_render_exactly_for_a_plain_scene():
    scene = Scene(shape="square", color="red", size="large", position="center", background="blue")
    image, labels = scene.render()
    found = analyse(image)
    assert (found.color, found.shape, found.size, found.position) == ("red", "square", "large", "center")
    assert np.array_equal(found.class_map, labels)
    assert found.mask.dtype == bool and found.class_map.dtype == np.uint8


def test_an_image_without_an_object_reads_as_background_only():
    found = analyse(Image.new("RGB", (64, 64), COLORS["green"]))
    assert found.background == "green"
    assert not found.found
    assert found.shape is found.color is found.size is found.position is None
    assert not found.mask.any() and not found.class_map.any()


def test_a_larger_render_reads_the_same():
    scene = Scene(shape="triangle", color="yellow", size="small", position="bottom right", background="black")
    image, labels = scene.render(128)
    found = analyse(image)
    assert (found.color, found.shape, found.size, found.position) == (
        "yellow",
        "triangle",
        "small",
        "bottom right",
    )
    assert class_iou(labels, found.class_map) > 0.97


def test_grid_position_cells():
    for name, (fx, fy) in POSITIONS.items():
        assert grid_position(fx, fy) == name
        assert grid_position(fx + 0.1, fy - 0.1) == name
    assert grid_position(0.0, 0.0) == "top left"
    assert grid_position(1.0, 0.5) == "right"


def test_nearest_color_and_class_iou():
    assert nearest_color((230, 50, 30)) == "red"
    a = np.zeros((4, 4), dtype=np.uint8)
    b = a.copy()
    assert class_iou(a, b) == 1.0
    b[:2] = 1  # background IoU 8/16, class 1 IoU 0/8
    assert class_iou(a, b) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        class_iou(a, np.zeros((3, 3)))


def test_components_and_holes():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:4, 1:4] = True
    mask[2, 2] = False  # a hole
    mask[6, 6] = mask[7, 7] = True  # diagonal neighbours: one 8-connected component
    labels, count = label_components(mask)
    assert count == 2
    assert labels[6, 6] == labels[7, 7] != labels[1, 1]
    filled = fill_holes(mask)
    assert filled[2, 2] and filled.sum() == mask.sum() + 1
    biggest = largest_component(mask)
    assert biggest.sum() == 8 and not biggest[6, 6]
    assert not largest_component(np.zeros((3, 3), dtype=bool)).any()


def _pair_misses(seed: int, count: int, perturb: bool) -> tuple[dict[str, int], list[str]]:
    from training.analyse import analyse_pair, relation
    from training.shapes import random_pair

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    misses = dict.fromkeys(("background", "count", "colors", "shapes", "sizes", "relation", "miou"), 0)
    notes: list[str] = []
    for _ in range(count):
        pair = random_pair(rng)
        image, labels = pair.render()
        if perturb:
            image = _perturbed(image, noise)
        read = analyse_pair(image)
        first, second = read.find(pair.first.color), read.find(pair.second.color)
        wrong = {
            "background": read.background != pair.background,
            "count": len(read.objects) != 2,
            "colors": first is None or second is None,
        }
        if first is not None and second is not None:
            wrong["shapes"] = (first.shape, second.shape) != (pair.first.shape, pair.second.shape)
            wrong["sizes"] = (first.size, second.size) != (pair.first.size, pair.second.size)
            wrong["relation"] = relation(first, second) != pair.relation
        wrong["miou"] = class_iou(labels, read.class_map) < 0.9
        for name, bad in wrong.items():
            misses[name] += bad
            if bad and len(notes) < 10:
                notes.append(f"{name}: {pair}")
    return misses, notes


def test_reads_back_two_shapes_from_clean_and_noisy_renders():
    misses, notes = _pair_misses(31, 300, perturb=False)
    assert not any(misses.values()), (misses, notes)
    misses, notes = _pair_misses(37, 300, perturb=True)
    assert all(value <= 6 for value in misses.values()), (misses, notes)  # 98 %


def test_two_touching_shapes_are_split_by_colour_and_one_shape_reads_as_one():
    from training.analyse import analyse_pair
    from training.shapes import Pair

    left = Scene(
        shape="circle", color="red", size="large", position="left", background="white", jitter=(2, 0)
    )
    right = Scene(
        shape="square", color="blue", size="large", position="right", background="white", jitter=(-2, 0)
    )
    image, labels = Pair(left, right, "left of").render()
    assert label_components(labels > 0)[1] == 1  # drawn touching: one component
    read = analyse_pair(image)
    assert [(o.color, o.shape, o.position) for o in read.objects] in (
        [("red", "circle", "left"), ("blue", "square", "right")],
        [("blue", "square", "right"), ("red", "circle", "left")],
    )
    single, _ = left.render()
    assert [(o.color, o.shape) for o in analyse_pair(single).objects] == [("red", "circle")]
    empty = analyse_pair(Image.new("RGB", (64, 64), COLORS["gray"]))
    assert empty.background == "gray" and empty.objects == [] and not empty.class_map.any()
    assert empty.find("red") is None
