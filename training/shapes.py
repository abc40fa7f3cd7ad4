"""Procedural captioned scenes with segmentation maps: the default model's training data.

A scene is one shape (circle, square, triangle) of a colour and size, at one of nine positions, on
a plain background of another colour. Its caption says so ("a small red circle at the top left on a
blue background") and its class map marks the shape's pixels. A :class:`Pair` is two shapes, one
beside or above the other ("a red circle to the left of a blue square"), both on the class map. Everything derives from a seed, so a
data set is reproducible and nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 9, "large": 15}  # half the side, in pixels at 64x64
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# segmentation classes and the colours they are painted in on a class map
CLASSES: tuple[str, ...] = ("background", *SHAPES)
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 60, 60), (60, 255, 60), (60, 60, 255))


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str
    jitter: tuple[int, int] = (0, 0)
    size_jitter: int = 0

    def caption(
        self, *, with_size: bool = True, with_position: bool = True, with_background: bool = True
    ) -> str:
        words = ["a"]
        if with_size:
            words.append(self.size)
        words += [self.color, self.shape]
        if with_position:
            words.append("in the center" if self.position == "center" else f"at the {self.position}")
        if with_background:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    def geometry(self, size: int = SIZE) -> tuple[float, float, float]:
        fx, fy = POSITIONS[self.position]
        scale = size / SIZE
        cx = fx * size + self.jitter[0] * scale
        cy = fy * size + self.jitter[1] * scale
        return cx, cy, (SIZES[self.size] + self.size_jitter) * scale

    def render(self, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and the (H, W) class map (0 = background, 1 + shape index)."""
        image = Image.new("RGB", (size, size), COLORS[self.background])
        labels = Image.new("L", (size, size), 0)
        self.draw(image, labels)
        return image, np.asarray(labels, dtype=np.uint8)

    def object_words(self) -> str:
        """The object alone: "a small red circle"."""
        return f"a {self.size} {self.color} {self.shape}"

    def draw(self, image: Image.Image, labels: Image.Image) -> None:
        """Draw the shape onto ``image`` (its colour) and ``labels`` (its class), both of one size."""
        cx, cy, r = self.geometry(image.size[0])
        for canvas, fill in ((image, COLORS[self.color]), (labels, 1 + SHAPES.index(self.shape))):
            draw = ImageDraw.Draw(canvas)
            if self.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif self.shape == "square":
                side = r * 0.9  # equal area feel: a square of the same half-side looks much larger
                draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


# two objects: where the first one is, seen from the second
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Pair:
    """Two shapes on one background, the first ``relation`` the second ("left of": the first in the
    left column, the second in the right one, both in one row; "above": one column, top and bottom
    rows). Each shape keeps its own colour, size and class on the class map."""

    first: Scene
    second: Scene
    relation: str

    @property
    def background(self) -> str:
        return self.first.background

    def caption(self, *, with_background: bool = True) -> str:
        words = f"{self.first.object_words()} {RELATIONS[self.relation]} {self.second.object_words()}"
        return f"{words} on a {self.background} background" if with_background else words

    def render(self, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and the (H, W) class map of both shapes."""
        image = Image.new("RGB", (size, size), COLORS[self.background])
        labels = Image.new("L", (size, size), 0)
        self.first.draw(image, labels)
        self.second.draw(image, labels)
        return image, np.asarray(labels, dtype=np.uint8)


def random_pair(rng: random.Random) -> Pair:
    """Two shapes of two colours (neither the background's) in a random relation."""
    background = rng.choice(list(COLORS))
    first_color = rng.choice([c for c in COLORS if c != background])
    second_color = rng.choice([c for c in COLORS if c not in (background, first_color)])
    relation = rng.choice(list(RELATIONS))
    if relation in ("left of", "right of"):
        row = rng.choice(("top ", "", "bottom "))
        places = (f"{row}left".strip(), f"{row}right".strip())
    else:
        column = rng.choice((" left", "", " right"))
        places = (f"top{column}".strip(), f"bottom{column}".strip())
    if relation in ("right of", "below"):
        places = (places[1], places[0])
    first, second = (
        Scene(
            shape=rng.choice(SHAPES),
            color=color,
            size=rng.choice(list(SIZES)),
            position=place,
            background=background,
            jitter=(rng.randint(-2, 2), rng.randint(-2, 2)),
            size_jitter=rng.randint(-1, 1),
        )
        for color, place in zip((first_color, second_color), places, strict=True)
    )
    return Pair(first, second, relation)


def random_scene(rng: random.Random) -> Scene:
    color = rng.choice(list(COLORS))
    background = rng.choice([c for c in COLORS if c != color])
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        background=background,
        jitter=(rng.randint(-2, 2), rng.randint(-2, 2)),
        size_jitter=rng.randint(-1, 1),
    )


def class_map_image(labels: np.ndarray) -> Image.Image:
    """A class map drawn in the palette colours (what a user paints in the segmentation tab)."""
    return Image.fromarray(np.asarray(PALETTE, dtype=np.uint8)[labels])


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption with parts left out now and then, and sometimes none (for classifier-free guidance)."""
    roll = rng.random()
    if roll < 0.1:
        return ""
    return scene.caption(
        with_size=rng.random() > 0.15, with_position=rng.random() > 0.15, with_background=rng.random() > 0.1
    )


def example_captions(count: int = 6, seed: int = 2024) -> list[str]:
    """Full captions of seeded scenes, for the UI's example prompts."""
    rng = random.Random(seed)
    return [random_scene(rng).caption() for _ in range(count)]


def vocabulary() -> dict[str, list[str]]:
    """The words the model knows, for the UI's examples."""
    return {
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "relations": list(RELATIONS),
    }
