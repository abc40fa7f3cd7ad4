"""Typed objects that travel through one generation and through the plugin hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from webui.engine.bundle import ModelBundle
    from webui.request import GenerationRequest


@dataclass
class ControlInput:
    """One ControlNet applied during denoising.

    ``image`` is the control image, (1, 3, H, W) in [0, 1] at the output size. The ControlNet
    acts for the fraction of steps between ``start`` and ``end`` with weight ``scale``.
    """

    model: Any
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "control"


LatentTransform = Callable[[torch.Tensor, "RunContext"], torch.Tensor]


@dataclass
class Conditioning:
    """Everything the denoising loop is conditioned on, filled in by conditioning plugins.

    Images are given in pixel space; the engine does every VAE encode itself, in a fixed order
    (init image, initial noise, masked image), so that a seed draws the same random numbers as in
    diffusers' reference pipelines whatever plugins are installed.

    Text: ``prompt_embeds``/``negative_prompt_embeds`` (B, T, D); SDXL also needs the pooled
    embeddings and ``add_time_ids``. Guidance is classifier-free with ``guidance_scale``.
    Init image: ``init_image`` (1, 3, H, W) in [-1, 1] and ``strength``; ``init_latent_transforms``
    run on its latents (e.g. inpainting's "latent noise" fill).
    Mask: ``mask`` (1, 1, H, W) in {0, 1}, 1 = repaint; ``masked_image`` (1, 3, H, W) in [-1, 1],
    the image with the masked area cleared (used by 9-channel inpainting UNets).
    Controls: ControlNets with their images.
    ``metadata``: entries for the image's ``parameters`` text, in order.
    """

    guidance_scale: float = 7.0
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None
    negative_add_time_ids: torch.Tensor | None = None
    init_image: torch.Tensor | None = None
    strength: float = 1.0
    init_latent_transforms: list[LatentTransform] = field(default_factory=list)
    mask: torch.Tensor | None = None
    masked_image: torch.Tensor | None = None
    controls: list[ControlInput] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


class GenerationStopped(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside a batch (e.g. between the text encoder's chunks) when the request was
    interrupted or the batch skipped; the engine catches it and keeps what is finished."""


class GenerationControl:
    """Per-request interrupt and skip switches, safe to flip from another thread.

    ``interrupt()`` stops the whole request after the current step and keeps what is finished;
    ``skip()`` stops the current batch only and moves on to the next one.
    """

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()

    @property
    def stopped(self) -> bool:
        """Interrupted, or the current batch skipped."""
        return self._interrupt.is_set() or self._skip.is_set()

    def check(self) -> None:
        """Raise :class:`GenerationStopped` if the request was interrupted or the batch skipped:
        for long work between sampler steps (text encoding) to stop within one step."""
        if self.stopped:
            raise GenerationStopped()


@dataclass
class RunContext:
    """Per-request state handed to every hook of one generation. Never shared between requests.

    ``seeds`` are the seeds of the batch being generated (one per image). ``state`` is scratch
    space for plugins, keyed by plugin name by convention (e.g. the "only masked" crop box).
    """

    bundle: ModelBundle
    request: GenerationRequest
    width: int
    height: int
    device: torch.device
    dtype: torch.dtype
    seeds: list[int] = field(default_factory=list)
    batch_index: int = 0
    control: GenerationControl = field(default_factory=GenerationControl)
    state: dict[str, Any] = field(default_factory=dict)
    engine: Any = None

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with that image's seed (device-independent noise)."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in self.seeds]


@dataclass
class StepInfo:
    """Handed to ``on_step`` after every denoising step.

    ``step`` counts from 1 to ``total`` (sampler steps, as users count them); ``latents`` is the
    current latent batch (do not modify it). Set ``context.control.interrupt()`` to stop.
    """

    context: RunContext
    step: int
    total: int
    timestep: Any
    latents: torch.Tensor


@dataclass
class OutputImage:
    """One finished image, handed to ``postprocess_images``; plugins may replace ``image``.

    ``pixels`` is the VAE's decoded output as floats, (3, H, W) in [0, 1], before any
    post-processing (for exact comparisons and high-bit-depth output).
    """

    image: Image.Image
    seed: int
    index: int
    parameters: dict[str, Any] = field(default_factory=dict)
    pixels: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A model offered to the user. ``source`` is what ``load_model`` receives."""

    name: str
    source: str
    kind: str = "checkpoint"  # "checkpoint", "vae", "controlnet", "lora" or "embedding"
    plugin: str | None = None


@dataclass
class LoadContext:
    """What a model loader needs besides the source: where models live and where they go."""

    models_dir: str | None
    device: torch.device
    dtype: torch.dtype
    allow_download: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    # False when ``source`` came from the web: then it is a checked absolute path, a name inside
    # ``models_dir`` or a hub id, and a loader must not try it as a path of its own
    allow_paths: bool = True
    # True only when the user opted in (--allow-pickle): pickle checkpoints (.ckpt/.pt/.pth/.bin) may
    # then be read, and only with torch.load(weights_only=True); see webui.engine.files
    allow_pickle: bool = False
