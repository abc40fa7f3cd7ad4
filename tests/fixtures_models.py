"""Real diffusers model folders on disk, written from the tiny random components.

The weights are those of ``components.sd_components`` (seeded), so a folder written here and the
in-memory components built again with the same arguments hold identical tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from components import bundle_from, make_controlnet, sd_components
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from webui.engine.bundle import ModelBundle
from webui.engine.segmap import ADE20K

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def tiny_components(
    tokenizer_dir: str | Path, *, controlnet: bool = False, in_channels: int = 4
) -> dict[str, Any]:
    """The in-memory components that :func:`save_tiny_model` writes (plus ``"controlnet"`` if asked)."""
    components = sd_components(Path(tokenizer_dir), in_channels=in_channels)
    if controlnet:
        components["controlnet"] = make_controlnet(components["unet"])
    return components


def tiny_bundle(tokenizer_dir: str | Path, *, controlnet: bool = False, in_channels: int = 4) -> ModelBundle:
    """A bundle over the same weights as :func:`save_tiny_model`, built in memory."""
    components = tiny_components(tokenizer_dir, controlnet=controlnet, in_channels=in_channels)
    cn = components.pop("controlnet", None)
    return bundle_from(components, controlnet=cn)


def save_tiny_model(folder: str | Path, *, controlnet: bool = False, in_channels: int = 4) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (safetensors weights) to ``folder``.

    With ``controlnet`` a ``controlnet/`` subfolder holds a segmentation ControlNet and
    ``model_index.json`` lists it, as a combined model folder would.
    """
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tokenizer_dir:
        components = tiny_components(tokenizer_dir, controlnet=controlnet, in_channels=in_channels)
        cn = components.pop("controlnet", None)
        StableDiffusionPipeline(**components).save_pretrained(folder, safe_serialization=True)
    if cn is not None:
        cn.save_pretrained(folder / "controlnet", safe_serialization=True)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["controlnet"] = ["diffusers", "ControlNetModel"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def copy_model(src: str | Path, dst: str | Path) -> Path:
    """A copy of a model folder (for tests that damage it)."""
    shutil.copytree(src, dst)
    return Path(dst)


def corrupt_unet_weights(folder: str | Path, how: str = "garbage") -> Path:
    """Damage the UNet's safetensors file: ``"garbage"`` overwrites it, ``"truncated"`` cuts it short."""
    path = Path(folder) / UNET_WEIGHTS
    if how == "garbage":
        path.write_bytes(b"this is not a safetensors file\x00\xff" * 64)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return path


def make_unet_pickle_only(folder: str | Path) -> Path:
    """Replace the UNet's safetensors weights by the same tensors in a pickle ``.bin`` file."""
    weights = Path(folder) / UNET_WEIGHTS
    pickle_path = weights.with_suffix(".bin")
    torch.save(load_file(weights), pickle_path)
    weights.unlink()
    return pickle_path


def random_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def rect_mask(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 255
    return Image.fromarray(mask, "L")


def seg_classes(size: int = 64) -> np.ndarray:
    """An (H, W) ADE20K class map: sky above, tree bottom left, a person bottom right."""
    classes = np.zeros((size, size), dtype=np.int64)
    classes[: size // 2] = 2  # sky
    classes[size // 2 :, : size // 2] = 4  # tree
    classes[size // 2 + 8 :, size // 2 + 4 :] = 12  # person
    return classes


def seg_map(size: int = 64) -> Image.Image:
    return Image.fromarray(ADE20K.colors[seg_classes(size)].astype(np.uint8))
