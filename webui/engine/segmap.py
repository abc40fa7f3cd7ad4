"""Segmentation maps for the segmentation ControlNet: the ADE20K palette, snapping, rendering.

A segmentation map is an RGB image in which every pixel has the colour of one class. The public
``lllyasviel/sd-controlnet-seg`` ControlNet was trained on maps drawn with the ADE20K palette of
the ControlNet annotator (UniFormer/mmsegmentation), reproduced here as :data:`ADE20K_PALETTE`.
A ControlNet trained on another palette ships a ``palette.json`` next to its weights
(see :class:`Palette`).

Note: the published palette gives "road" (6) and "skyscraper" (48) the same colour,
(140, 140, 140), so it has 150 entries but 149 distinct colours; a pixel of that colour is read
as "road", the lower index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from webui.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
"""The 150 ADE20K class names, in label order."""

ADE20K_PALETTE: np.ndarray = np.array([
    [120, 120, 120], [180, 120, 120], [  6, 230, 230], [ 80,  50,  50],  # 0-3
    [  4, 200,   3], [120, 120,  80], [140, 140, 140], [204,   5, 255],  # 4-7
    [230, 230, 230], [  4, 250,   7], [224,   5, 255], [235, 255,   7],  # 8-11
    [150,   5,  61], [120, 120,  70], [  8, 255,  51], [255,   6,  82],  # 12-15
    [143, 255, 140], [204, 255,   4], [255,  51,   7], [204,  70,   3],  # 16-19
    [  0, 102, 200], [ 61, 230, 250], [255,   6,  51], [ 11, 102, 255],  # 20-23
    [255,   7,  71], [255,   9, 224], [  9,   7, 230], [220, 220, 220],  # 24-27
    [255,   9,  92], [112,   9, 255], [  8, 255, 214], [  7, 255, 224],  # 28-31
    [255, 184,   6], [ 10, 255,  71], [255,  41,  10], [  7, 255, 255],  # 32-35
    [224, 255,   8], [102,   8, 255], [255,  61,   6], [255, 194,   7],  # 36-39
    [255, 122,   8], [  0, 255,  20], [255,   8,  41], [255,   5, 153],  # 40-43
    [  6,  51, 255], [235,  12, 255], [160, 150,  20], [  0, 163, 255],  # 44-47
    [140, 140, 140], [250,  10,  15], [ 20, 255,   0], [ 31, 255,   0],  # 48-51
    [255,  31,   0], [255, 224,   0], [153, 255,   0], [  0,   0, 255],  # 52-55
    [255,  71,   0], [  0, 235, 255], [  0, 173, 255], [ 31,   0, 255],  # 56-59
    [ 11, 200, 200], [255,  82,   0], [  0, 255, 245], [  0,  61, 255],  # 60-63
    [  0, 255, 112], [  0, 255, 133], [255,   0,   0], [255, 163,   0],  # 64-67
    [255, 102,   0], [194, 255,   0], [  0, 143, 255], [ 51, 255,   0],  # 68-71
    [  0,  82, 255], [  0, 255,  41], [  0, 255, 173], [ 10,   0, 255],  # 72-75
    [173, 255,   0], [  0, 255, 153], [255,  92,   0], [255,   0, 255],  # 76-79
    [255,   0, 245], [255,   0, 102], [255, 173,   0], [255,   0,  20],  # 80-83
    [255, 184, 184], [  0,  31, 255], [  0, 255,  61], [  0,  71, 255],  # 84-87
    [255,   0, 204], [  0, 255, 194], [  0, 255,  82], [  0,  10, 255],  # 88-91
    [  0, 112, 255], [ 51,   0, 255], [  0, 194, 255], [  0, 122, 255],  # 92-95
    [  0, 255, 163], [255, 153,   0], [  0, 255,  10], [255, 112,   0],  # 96-99
    [143, 255,   0], [ 82,   0, 255], [163, 255,   0], [255, 235,   0],  # 100-103
    [  8, 184, 170], [133,   0, 255], [  0, 255,  92], [184,   0, 255],  # 104-107
    [255,   0,  31], [  0, 184, 255], [  0, 214, 255], [255,   0, 112],  # 108-111
    [ 92, 255,   0], [  0, 224, 255], [112, 224, 255], [ 70, 184, 160],  # 112-115
    [163,   0, 255], [153,   0, 255], [ 71, 255,   0], [255,   0, 163],  # 116-119
    [255, 204,   0], [255,   0, 143], [  0, 255, 235], [133, 255,   0],  # 120-123
    [255,   0, 235], [245,   0, 255], [255,   0, 122], [255, 245,   0],  # 124-127
    [ 10, 190, 212], [214, 255,   0], [  0, 204, 255], [ 20,   0, 255],  # 128-131
    [255, 255,   0], [  0, 153, 255], [  0,  41, 255], [  0, 255, 204],  # 132-135
    [ 41,   0, 255], [ 41, 255,   0], [173,   0, 255], [  0, 245, 255],  # 136-139
    [ 71,   0, 255], [122,   0, 255], [  0, 255, 184], [  0,  92, 255],  # 140-143
    [184, 255,   0], [  0, 133, 255], [255, 214,   0], [ 25, 194, 194],  # 144-147
    [102, 255,   0], [ 92,   0, 255],  # 148-149
], dtype=np.uint8)
# fmt: on
"""The ADE20K colours, (150, 3) uint8 RGB, row ``i`` for class ``i``."""
ADE20K_PALETTE.setflags(write=False)

_CHUNK = 1 << 16  # distinct colours per distance block in :func:`snap_to_palette`
_TABLE_MIN_PIXELS = 1 << 18  # from this many pixels, distinct colours are found with a 2**24 table


@dataclass(frozen=True, eq=False)
class Palette:
    """The classes of a segmentation ControlNet and the colour each is drawn in.

    ``colors`` is an (N, 3) uint8 RGB array (stored read-only); ``classes`` has N names. A
    ControlNet directory may hold a ``palette.json`` with ``{"name": ..., "classes": [...],
    "colors": [[r, g, b], ...]}``; without one the ADE20K palette (:data:`ADE20K`) is used.
    """

    name: str
    classes: tuple[str, ...]
    colors: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        colors = np.asarray(self.colors)
        if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] == 0:
            raise ValueError(
                f"palette colors must be an (N, 3) array of RGB values, got shape {colors.shape}"
            )
        if not np.issubdtype(colors.dtype, np.integer) and not np.all(np.equal(np.mod(colors, 1), 0)):
            raise ValueError("palette colors must be whole numbers")
        if colors.min() < 0 or colors.max() > 255:
            raise ValueError("palette colors must be between 0 and 255")
        colors = colors.astype(np.uint8)  # always a copy, so the caller's array stays theirs
        colors.setflags(write=False)
        classes = tuple(str(c) for c in self.classes)
        if len(classes) != len(colors):
            raise ValueError(f"palette has {len(classes)} class names but {len(colors)} colours")
        object.__setattr__(self, "colors", colors)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "name", str(self.name))

    def __len__(self) -> int:
        return len(self.classes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Palette):
            return NotImplemented
        return (
            self.name == other.name
            and self.classes == other.classes
            and np.array_equal(self.colors, other.colors)
        )

    def __hash__(self) -> int:
        return hash((self.name, self.classes, self.colors.tobytes()))

    def index(self, class_name: str) -> int:
        """The index of ``class_name``."""
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise KeyError(f"no class {class_name!r} in palette {self.name!r}") from None

    def color(self, class_name: str) -> tuple[int, int, int]:
        """The RGB colour of ``class_name``."""
        r, g, b = (int(v) for v in self.colors[self.index(class_name)])
        return r, g, b

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "colors": [[int(v) for v in row] for row in self.colors],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The palette as ``palette.json`` text; also written to ``path`` when one is given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "palette") -> Palette:
        """A palette from the ``palette.json`` structure; ``classes`` defaults to ``class 0``, ..."""
        if not isinstance(data, dict) or "colors" not in data:
            raise ValueError('a palette must be an object with a "colors" list')
        colors = data["colors"]
        if not isinstance(colors, list) or not all(
            isinstance(row, list) and len(row) == 3 and all(_is_int(v) for v in row) for row in colors
        ):
            raise ValueError('"colors" must be a list of [r, g, b] integer triples')
        classes = data.get("classes")
        if classes is None:
            classes = [f"class {i}" for i in range(len(colors))]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError('"classes" must be a list of names')
        name = data.get("name", default_name)
        if not isinstance(name, str):
            raise ValueError('"name" must be text')
        return cls(name, tuple(classes), np.array(colors, dtype=np.int64).reshape(-1, 3))

    @classmethod
    def from_json(cls, path: str | Path) -> Palette:
        """Read a ``palette.json``. Raises :class:`ModelNotFoundError` / :class:`ModelLoadError`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelNotFoundError(f"palette file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read palette {path}: {exc}") from None
        try:
            return cls.from_dict(json.loads(text), default_name=path.parent.name or path.stem)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise ModelLoadError(f"invalid palette {path}: {exc}") from None


ADE20K = Palette("ade20k", ADE20K_CLASSES, ADE20K_PALETTE)
"""The palette of ``lllyasviel/sd-controlnet-seg``."""

PALETTE_FILE = "palette.json"


def palette_file(path: str | Path) -> Path:
    """Where the ControlNet at ``path`` keeps its palette: ``palette.json`` inside a ControlNet
    folder, the sidecar ``<name>.palette.json`` beside a single weights file."""
    path = Path(path)
    return path / PALETTE_FILE if path.is_dir() else path.with_name(f"{path.stem}.{PALETTE_FILE}")


def find_palette(path: str | Path, default: Palette | None = ADE20K) -> Palette | None:
    """The class palette of the ControlNet at ``path`` (a folder or a weights file): its
    :func:`palette_file` when there is one, else ``default``. The one lookup that the loaders and
    the web UI share. A palette file that cannot be read raises :class:`ModelLoadError`."""
    candidate = palette_file(path)
    if not candidate.is_file():
        return default
    return Palette.from_json(candidate)


def snap_to_palette(
    image: Image.Image, palette: Palette | np.ndarray = ADE20K
) -> tuple[Image.Image, np.ndarray, int]:
    """Map every pixel of ``image`` to the nearest palette colour.

    Colours outside the palette (anti-aliased edges, JPEG noise, a hand-painted map) map to the
    class whose colour is nearest in squared RGB distance; ties go to the lower class index.
    Returns the snapped RGB image, the (H, W) int64 class-index map, and how many pixels were not
    exactly a palette colour. The distances are computed once per distinct colour of the image.
    """
    colors = _colors_of(palette)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    flat = rgb.reshape(-1, 3).astype(np.uint32)
    keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    unique, inverse = _unique_inverse(keys)
    uniq_rgb = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], axis=1)

    nearest, exact = _nearest(uniq_rgb, colors)
    class_map = nearest[inverse].reshape(height, width)
    counts = np.bincount(inverse, minlength=len(unique))
    off_palette = int(counts[~exact].sum())
    snapped = Image.fromarray(np.ascontiguousarray(colors[class_map]))
    return snapped, class_map, off_palette


def render_class_map(class_map: np.ndarray, palette: Palette | np.ndarray = ADE20K) -> Image.Image:
    """The RGB segmentation map that draws each class index of ``class_map`` in its palette colour."""
    colors = _colors_of(palette)
    indices = np.asarray(class_map)
    if indices.ndim != 2:
        raise InvalidRequestError(f"a class map must be 2-D (H, W), got shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise InvalidRequestError(f"a class map must hold integer class indices, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(colors)):
        raise InvalidRequestError(
            f"class indices must be in [0, {len(colors) - 1}], got {indices.min()}..{indices.max()}"
        )
    return Image.fromarray(np.ascontiguousarray(colors[indices]))


def control_image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The ControlNet conditioning tensor, (1, 3, height, width) float32 in [0, 1].

    The map is resized with nearest-neighbour sampling: any filtering would blend the colours of
    neighbouring classes into colours that belong to no class.
    """
    import torch  # here, not above: the web UI reads palettes from this module without torch

    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.NEAREST)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def _colors_of(palette: Palette | np.ndarray) -> np.ndarray:
    if isinstance(palette, Palette):
        return palette.colors
    colors = np.asarray(palette)
    if colors.ndim != 2 or colors.shape[1] != 3 or len(colors) == 0:
        raise ValueError(f"a palette must be an (N, 3) array of RGB colours, got shape {colors.shape}")
    return colors.astype(np.uint8)


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct 24-bit colour keys and, per pixel, the position of its key among them.

    Same result as ``np.unique(keys, return_inverse=True)``; large images use a table indexed by
    colour instead of a sort, which is several times faster.
    """
    if keys.size < _TABLE_MIN_PIXELS:
        unique, inverse = np.unique(keys, return_inverse=True)
        return unique, inverse.reshape(-1)
    present = np.zeros(1 << 24, dtype=bool)
    present[keys] = True
    unique = np.flatnonzero(present).astype(np.uint32)
    slot = np.empty(1 << 24, dtype=np.int32)
    slot[unique] = np.arange(len(unique), dtype=np.int32)
    return unique, slot[keys]


def _nearest(points: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each RGB row of ``points``: the index of the nearest colour, and whether it is exact.

    The squared distance is ``|p|^2 + (|c|^2 - 2 p.c)``; the bracket comes from one float32 matrix
    product of ``[p, 1]`` with ``[-2c, |c|^2]``. Every partial sum is an integer below 2**24, so it
    is exact and the result equals a direct squared-distance argmin.
    """
    pal = colors.astype(np.float32)
    weights = np.concatenate([-2.0 * pal.T, (pal * pal).sum(axis=1)[None, :]], axis=0)  # (4, N)
    nearest = np.empty(len(points), dtype=np.int64)
    exact = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), _CHUNK):
        block = points[start : start + _CHUNK]
        augmented = np.ones((len(block), 4), dtype=np.float32)
        augmented[:, :3] = block
        score = augmented @ weights
        idx = score.argmin(axis=1)
        best = np.take_along_axis(score, idx[:, None], axis=1)[:, 0]
        own = (augmented[:, :3] * augmented[:, :3]).sum(axis=1)
        nearest[start : start + _CHUNK] = idx
        exact[start : start + _CHUNK] = best + own == 0
    return nearest, exact


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
