"""What a model is, read from its files without loading its weights: one reader for every caller.

The facts: its **native size** (the side it was trained at), its **recommended guidance, steps
and sampler** (``model_index.json``'s ``defaults.cfg_scale``, ``steps``, ``sampler``: a few-step
model's, say), the **vocabulary** and prompt **examples** a
project's model may list (``vocabulary``, ``ui.examples``), whether it ships a ControlNet, and that
ControlNet's class **palette**.

The web UI reads them with :func:`read_model_info` before a model is loaded (to set the size and
guidance controls, the example prompts and the segmentation brush); the engine's loaded bundle
answers the same questions with the same rules (:attr:`ModelBundle.default_size
<webui.engine.bundle.ModelBundle.default_size>` calls :func:`native_size`,
``default_cfg_scale`` calls :func:`model_default_cfg`; both live in
:mod:`webui.engine.model_defaults`, which the bundle imports without this reader), and the command
line goes through the engine. So a model's size and guidance are the same wherever they are shown
or used.

Native size, first match wins:

1. ``default_size`` in ``model_index.json`` (a project's own model says so);
2. the UNet's ``sample_size`` times the VAE's downscale factor, ``2 ** (levels - 1)``: 64 × 8 = 512
   for SD 1.x, 96 × 8 = 768 for the SD 2.x 768-v models, 128 × 8 = 1024 for SDXL;
3. 1024 for a model with two text encoders (SDXL), else 512.

A single-file checkpoint has no configs: its size is the one :mod:`webui.engine.single_file` reads
from the file's header and metadata (768 for SD 2.x v-prediction), as its loader uses it.

Reading never fails: a missing or unreadable file leaves that fact at its default (and an
unreadable palette is logged), so a broken model folder cannot break the page that lists it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webui.engine.model_defaults import (
    DEFAULT_CFG_SCALE,
    DEFAULT_SIZE,
    model_default_cfg,
    model_default_sampler,
    model_default_steps,
    native_size,
    vae_scale_factor,
)
from webui.engine.segmap import ADE20K, Palette, find_palette
from webui.errors import LatentStudioError

__all__ = [
    "DEFAULT_CFG_SCALE",
    "DEFAULT_SIZE",
    "ModelInfo",
    "model_default_cfg",
    "native_size",
    "read_model_info",
    "vae_scale_factor",
]

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What the UI shows about a model before it is loaded: read from its files, not its weights."""

    name: str
    default_size: int = DEFAULT_SIZE
    cfg_scale: float = DEFAULT_CFG_SCALE  # model_index.json's defaults.cfg_scale
    steps: int | None = None  # defaults.steps and defaults.sampler (None: the fields' own defaults)
    sampler: str | None = None
    vocabulary: dict[str, list[str]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # model_index.json's ui.examples
    palette: Palette = ADE20K
    has_controlnet: bool = False


def read_model_info(path: str | Path | None, name: str = "") -> ModelInfo:
    """The facts of the model at ``path``: a diffusers folder (``model_index.json``, the UNet's
    and VAE's ``config.json``, ``controlnet/palette.json``) or a single ``.safetensors`` checkpoint
    (its header). Anything else, or ``None``, gives the defaults."""
    info = ModelInfo(name=name)
    if path is None:
        return info
    path = Path(path)
    if path.is_dir():
        _read_folder(path, info)
    elif path.is_file() and path.suffix.lower() == ".safetensors":
        info.default_size = _file_size(path)
    return info


def _read_folder(folder: Path, info: ModelInfo) -> None:
    index = _json(folder / "model_index.json")
    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    levels = vae.get("block_out_channels")
    info.default_size = native_size(
        index,
        sample_size=unet.get("sample_size"),
        scale_factor=vae_scale_factor(levels) if isinstance(levels, list) and levels else None,
        two_text_encoders="text_encoder_2" in index,
    )
    info.cfg_scale = model_default_cfg(index)
    info.steps, info.sampler = model_default_steps(index), model_default_sampler(index)
    vocabulary = index.get("vocabulary")
    if isinstance(vocabulary, dict):
        info.vocabulary = {str(k): [str(w) for w in v] for k, v in vocabulary.items() if isinstance(v, list)}
    ui = index.get("ui")
    examples = ui.get("examples") if isinstance(ui, dict) else None
    if isinstance(examples, list):
        info.examples = [str(text) for text in examples]
    info.has_controlnet = "controlnet" in index
    try:
        info.palette = find_palette(folder / "controlnet") or ADE20K
    except LatentStudioError as error:
        log.warning("%s", error)


def _file_size(path: Path) -> int:
    """A single-file checkpoint's native size as its loader sees it (header and metadata only)."""
    from webui.engine.single_file import inspect_file

    try:
        return inspect_file(path).default_size
    except (LatentStudioError, OSError, ValueError) as error:
        log.debug("no native size from %s: %s", path, error)
        return DEFAULT_SIZE


def _json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
