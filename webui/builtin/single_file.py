"""Built-in loader for model *files*: original-layout ("single-file") checkpoints and ControlNets.

A source that is a weight file (``.safetensors``; ``.ckpt``/``.pt``/``.pth``/``.bin`` only with
``--allow-pickle``) is loaded here, offline, through :mod:`webui.engine.single_file`; folders and hub
ids fall through to the folder loader. A relative name is looked up under the models folder too.

A segmentation ControlNet gets its palette as folder ControlNets do: a sidecar ``<name>.palette.json``
when there is one, else ADE20K's for files named like the published ``control_v11p_sd15_seg`` /
``control_sd15_seg`` (``seg`` among the words of the name).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from webui.api import (
    ADE20K,
    WEIGHT_SUFFIXES,
    LoadContext,
    find_palette,
    hookimpl,
    load_single_file,
    load_single_file_controlnet,
)

LATENT_STUDIO_API = 1


@hookimpl
def load_model(source: str, kind: str, context: LoadContext) -> Any:
    if kind not in ("checkpoint", "controlnet"):
        return None
    path = weight_file(source, context)
    if path is None:
        return None
    options = dict(device=context.device, dtype=context.dtype, allow_pickle=context.allow_pickle)
    if kind == "checkpoint":
        return load_single_file(path, **options)
    return attach_file_palette(load_single_file_controlnet(path, **options), path)


def weight_file(source: str, context: LoadContext) -> Path | None:
    """The weight file ``source`` names, or None when it names no file with a weight suffix.

    With ``context.allow_paths`` (command line, Python callers) a path as given (relative to the
    working folder, ``~``) is tried; names from the web are only absolute paths the model manager
    has checked. A relative name is also looked up under the models folder, never outside it.
    """
    given = Path(source)
    candidates = []
    if given.is_absolute() or context.allow_paths:
        candidates.append(given.expanduser())
    if context.models_dir and not given.is_absolute():
        root = Path(context.models_dir).resolve()
        inside = (root / source).resolve()
        if inside.is_relative_to(root):
            candidates.append(inside)
    for candidate in candidates:
        if candidate.suffix.lower() in WEIGHT_SUFFIXES and candidate.is_file():
            return candidate.resolve()
    return None


def attach_file_palette(controlnet: Any, path: Path) -> Any:
    """Give a segmentation ControlNet file its class palette (see the module docstring)."""
    palette = find_palette(path, default=None)  # a bad file is a ModelLoadError
    if palette is not None:
        controlnet.seg_palette = palette
    elif "seg" in re.split(r"[^a-z0-9]+", path.stem.lower()):
        controlnet.seg_palette = ADE20K
    return controlnet
