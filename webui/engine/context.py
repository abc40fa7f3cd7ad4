"""Typed objects that travel through one generation and through the plugin hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

# the stop switches live in a torch-free module (the web UI imports them); importable here as before
from webui.engine.control import GenerationControl, GenerationStopped  # noqa: F401

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


@dataclass
class RunContext:
    """Per-request state handed to every hook of one generation. Never shared between requests.

    ``seeds`` are the seeds of the batch being generated (one per image). ``state`` is scratch
    space for plugins, keyed by plugin name by convention (e.g. the "only masked" crop box).
    ``peak_size`` is set by a plugin in ``prepare_request`` when a later pass of the request works
    at a larger (width, height) than the first (a hires fix's second pass): the size limits and
    the memory plan are then chosen for it.
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
    peak_size: tuple[int, int] | None = None

    @property
    def fields(self) -> Any:
        """The engine's :class:`~webui.fields.FieldRegistry` (every registered field and task), or
        None for a context built without an engine."""
        return getattr(self.engine, "fields", None)

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with that image's seed (device-independent noise)."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in self.seeds]


@dataclass
class SecondPass:
    """A second denoising pass over a batch's latents, as a ``second_pass`` hook asks for it.

    ``request`` is the pass's own request (its ``width``/``height`` — set, a multiple of the model's
    factor —, ``steps``, ``sampler``, prompts, ``cfg_scale``; ``strength`` is how much of the
    schedule it runs); ``latents`` (B, C, height/f, width/f) are the scaled latents it starts from
    (e.g. the first pass's, upscaled). The pass runs like an image-to-image pass from them, with the
    same seeds, model patches and memory plan; the images keep the first request's infotext, to
    which the plugin adds its own entries.
    """

    request: GenerationRequest
    latents: torch.Tensor


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


class _ApplyUndo(AbstractContextManager[None]):
    def __init__(self, apply: Callable[[], Any], undo: Callable[[], Any] | None) -> None:
        self.apply, self.undo = apply, undo

    def __enter__(self) -> None:
        self.apply()

    def __exit__(self, *exc: object) -> None:
        if self.undo is not None:
            self.undo()


class ModelPatches:
    """The changes to the model one request makes, collected by the ``patch_model`` hook.

    ``add(name, apply, undo)``: ``apply()`` changes the model, ``undo()`` puts it back exactly.
    ``enter(name, manager)``: the same as a context manager (entering applies, leaving undoes), such
    as :func:`webui.engine.lora.apply_loras`. The hook only collects; the engine then applies the
    patches in the order they were added, under the model's lock, before the first batch, and undoes
    them in the reverse order when the request ends: normally, on an error (also one raised while a
    later patch is being applied: only the patches already applied are undone), on an interrupt or a
    skip. Every undo runs even when another one fails; the error is raised afterwards.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, AbstractContextManager[Any]]] = []

    def add(self, name: str, apply: Callable[[], Any], undo: Callable[[], Any] | None = None) -> None:
        """Apply ``apply()`` for the request and ``undo()`` afterwards (``None``: nothing to undo)."""
        self._items.append((name, _ApplyUndo(apply, undo)))

    def enter(self, name: str, manager: AbstractContextManager[Any]) -> None:
        """Enter the context manager ``manager`` for the request and leave it afterwards."""
        self._items.append((name, manager))

    @property
    def names(self) -> list[str]:
        """The patches' names, in the order they are applied."""
        return [name for name, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Apply every patch in order for the ``with`` block, undo them in reverse order after it."""
        with ExitStack() as stack:
            for _, manager in self._items:
                stack.enter_context(manager)
            yield


@dataclass(frozen=True)
class DenoiseStep:
    """One call of the denoiser, handed to the functions ``wrap_denoiser`` and ``wrap_guidance`` add.

    ``index`` counts the scheduler's timesteps from 0 to ``total - 1`` (a second-order sampler
    calls the denoiser twice per user-visible step); ``timestep`` is the scheduler's timestep and
    :attr:`sigma` its noise level where the scheduler has sigmas (Euler, DPM++, Heun...), else
    ``None``. ``encoder_hidden_states`` and ``added_cond_kwargs`` are what the UNet (and every
    ControlNet) receives; a denoiser wrapper may call the next function with
    ``dataclasses.replace(step, encoder_hidden_states=...)``. ``guided`` tells whether the batch
    is ``[unconditional; conditional]`` (classifier-free guidance) or the conditional half only.
    """

    context: RunContext
    index: int
    total: int
    timestep: Any
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    guided: bool = True
    guidance_scale: float = 1.0
    sigmas: Any = field(default=None, repr=False)  # the scheduler's sigmas, when it has them
    sigma_index: int | None = field(default=None, repr=False)

    @property
    def request(self) -> GenerationRequest:
        return self.context.request

    @property
    def sigma(self) -> float | None:
        """The noise level of this call (``sigmas[sigma_index]``), or ``None`` for schedulers
        without sigmas (DDIM, PNDM...)."""
        if self.sigmas is None or self.sigma_index is None or self.sigma_index >= len(self.sigmas):
            return None
        return float(self.sigmas[self.sigma_index])


DenoiserCall = Callable[[torch.Tensor, DenoiseStep], torch.Tensor]
"""``call(model_input, step) -> noise_pred``: the UNet (with the ControlNets) on the scaled latents."""

GuidanceCombine = Callable[[torch.Tensor, torch.Tensor, float, DenoiseStep], torch.Tensor]
"""``combine(uncond, cond, scale, step) -> noise_pred``: classifier-free guidance's combination."""
