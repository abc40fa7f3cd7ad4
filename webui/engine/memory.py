"""Memory and speed levers, a plan chosen per request, and recovery from running out of memory.

A :class:`MemorySettings` is what the user asked for (``--attention``, ``--vae-tiling``,
``--offload``...); "auto" settings are decided per request by :func:`choose_plan` from the free
device memory and the requested size. A :class:`MemoryPlan` is the decision: attention backend,
VAE slicing and tiling, CPU offload (whole models, or layer by layer), channels-last and the most
images decoded/denoised at once. :func:`applied` puts a plan on a model bundle for the duration of
one batch and takes it off again, so the cached bundle is the same for the next request.

When a batch runs out of memory anyway, the engine releases memory and retries it with
:func:`lower_plan`, one rung down the ladder: VAE tiling, then VAE slicing with sliced attention,
then model offload, then sequential offload (both on GPUs only), then half the batch at a time.
The attention backend stays: PyTorch's SDPA kernels never hold a whole score matrix, so slicing
attention would not lower the peak below theirs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from webui.errors import InvalidRequestError

if TYPE_CHECKING:
    from webui.engine.bundle import ModelBundle

__all__ = [
    "ATTENTION_BACKENDS",
    "OFFLOAD_MODES",
    "MemoryPlan",
    "MemorySettings",
    "applied",
    "auto_dtype",
    "choose_plan",
    "cpu_supports_bf16",
    "free_memory",
    "is_out_of_memory",
    "lower_plan",
    "release_memory",
    "to_channels_last",
    "trim_heap",
    "resolve_attention",
]

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "sliced")
OFFLOAD_MODES = ("auto", "none", "model", "sequential")
SWITCHES = ("auto", "on", "off")
# bf16 pays on a CPU with native bf16 arithmetic, for models big enough that the arithmetic, not the
# per-layer overhead, is the cost (the 13 M-parameter shapes model: 0.43 s -> 0.40 s, not worth the
# precision; SD 1.5's UNet at 512x512: 12.4 -> 6.6 s per step on a 2-core EPYC)
BF16_MIN_UNET_PARAMS = 200_000_000
# share of the free memory a plan may count on (the allocator's fragmentation, other processes)
_HEADROOM = 0.8


@dataclass(frozen=True)
class MemorySettings:
    """The user's choices. ``attention``: ``sdpa`` (PyTorch's scaled_dot_product_attention, the
    default), ``xformers`` (GPU, when the package is installed) or ``sliced``. ``vae_slicing`` /
    ``vae_tiling``: ``auto`` (when the size needs it), ``on`` or ``off``. ``offload``: ``auto``,
    ``none``, ``model`` (each model on the GPU only while it runs; A1111's --medvram) or
    ``sequential`` (layer by layer; --lowvram). ``recover``: retry a batch that ran out of memory
    with a lower-memory plan. ``compile``: run the UNet through ``torch.compile``
    (:mod:`webui.engine.compiled`; not with offload, whose hooks a compiled graph would not see).
    ``cpu_kernels``: SD-size models on the CPU use the faster exact kernels of
    :mod:`webui.engine.cpu_kernels` (not with ``compile``, which generates its own)."""

    attention: str = "sdpa"
    vae_slicing: str = "auto"
    vae_tiling: str = "auto"
    offload: str = "auto"
    channels_last: bool = False
    recover: bool = True
    compile: bool = False
    cpu_kernels: bool = True

    def __post_init__(self) -> None:
        _choice("attention", self.attention, ATTENTION_BACKENDS)
        _choice("vae_slicing", self.vae_slicing, SWITCHES)
        _choice("vae_tiling", self.vae_tiling, SWITCHES)
        _choice("offload", self.offload, OFFLOAD_MODES)


@dataclass(frozen=True)
class MemoryPlan:
    """What one batch runs with. ``max_batch``: at most this many images at once (None: all)."""

    attention: str = "sdpa"
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str = "none"
    channels_last: bool = False
    max_batch: int | None = None
    compile: bool = False

    def describe(self) -> str:
        """The levers in use, for the image metadata ("tiled VAE, model offload"), or "default"."""
        parts = []
        if self.attention != "sdpa":
            parts.append(f"{self.attention} attention")
        if self.vae_tiling:
            parts.append("tiled VAE")
        if self.vae_slicing:
            parts.append("sliced VAE")
        if self.offload != "none":
            parts.append(f"{self.offload} offload")
        if self.channels_last:
            parts.append("channels-last")
        if self.compile:
            parts.append("compiled UNet")
        if self.max_batch is not None:
            parts.append(f"{self.max_batch} image{'s' if self.max_batch > 1 else ''} at a time")
        return ", ".join(parts) or "default"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRequestError(f"{name} {value!r} is not one of {', '.join(allowed)}")


# -- choosing ---------------------------------------------------------------------------------


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # not installed, or built for another torch: either way not usable
        return False
    return True


def resolve_attention(wanted: str, device: torch.device) -> str:
    """``wanted``, or ``sdpa`` with a warning when it cannot run here (xformers without the package
    or without a CUDA device)."""
    if wanted == "xformers" and (device.type != "cuda" or not xformers_available()):
        why = (
            "it runs on CUDA GPUs only" if device.type != "cuda" else "the xformers package is not installed"
        )
        log.warning("xformers attention asked for, but %s: using PyTorch SDPA", why)
        return "sdpa"
    return wanted


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (x86 AVX512-BF16 or AMX; Arm's BF16 extension)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16", " bf16"))


def auto_dtype(device: torch.device, unet_params: int) -> torch.dtype:
    """The ``--dtype auto`` choice for a model: fp16 on GPUs; on the CPU bf16 for big models
    where the CPU computes bf16 natively, else fp32."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    if unet_params >= BF16_MIN_UNET_PARAMS and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory (within any per-process cap), or the
    system's available RAM."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        fraction = _memory_fraction(device)
        if fraction < 1.0:  # torch.cuda.set_per_process_memory_fraction: the cap is what counts
            free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
        return max(0, int(free))
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 1 << 34


def _memory_fraction(device: torch.device) -> float:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return 1.0
    try:
        return float(getter(device))
    except Exception:
        return 1.0


def module_bytes(module: Any) -> int:
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def estimate(
    bundle: ModelBundle, width: int, height: int, batch: int, *, slicing: bool = False, tiling: bool = False
) -> dict[str, int]:
    """Rough working memory in bytes of one batch: the UNet's activations (CFG doubles the batch)
    and the VAE decoder's (at full resolution; one image when sliced, one tile when tiled). The
    factors are conservative round numbers; the out-of-memory retry backs them up."""
    element = torch.finfo(bundle.dtype).bits // 8
    factor = bundle.vae_scale_factor
    latent_area = (width // factor) * (height // factor)
    unet_width = int(bundle.unet.config.block_out_channels[0])
    unet = 2 * batch * latent_area * unet_width * element * 24
    vae_width = int(bundle.vae.config.block_out_channels[0])
    images = 1 if slicing else batch
    area = width * height
    if tiling:
        tile = int(getattr(bundle.vae, "tile_sample_min_size", 512) or 512)
        area = min(area, tile * tile)
    vae = images * area * vae_width * element * 16
    return {"unet": unet, "vae": vae}


def choose_plan(
    settings: MemorySettings,
    bundle: ModelBundle,
    device: torch.device,
    *,
    width: int,
    height: int,
    batch: int,
    free: int | None = None,
) -> MemoryPlan:
    """The plan for one batch: the user's fixed choices, and for each ``auto`` one the least
    intrusive lever that makes the estimated working memory fit into ``free`` (default: what
    :func:`free_memory` reports; the loaded weights are already counted out of it on a GPU)."""
    plan = MemoryPlan(
        attention=resolve_attention(settings.attention, device),
        channels_last=settings.channels_last,
        vae_slicing=settings.vae_slicing == "on",
        vae_tiling=settings.vae_tiling == "on",
        offload=settings.offload if settings.offload != "auto" else "none",
        compile=settings.compile and settings.offload in ("auto", "none"),
    )
    budget = (free_memory(device) if free is None else free) * _HEADROOM

    def need(p: MemoryPlan) -> int:
        parts = estimate(bundle, width, height, batch, slicing=p.vae_slicing, tiling=p.vae_tiling)
        return max(parts.values())  # the UNet's activations are gone when the VAE decodes

    if settings.vae_slicing == "auto" and batch > 1 and need(plan) > budget:
        plan = dataclasses.replace(plan, vae_slicing=True)
    if settings.vae_tiling == "auto" and need(plan) > budget:
        plan = dataclasses.replace(plan, vae_tiling=True)
    if settings.offload == "auto" and device.type == "cuda" and need(plan) > budget:
        weights = sum(module_bytes(m) for m in _components(bundle))
        largest = max((module_bytes(m) for m in _components(bundle)), default=0)
        # model offload frees all but the running model; sequential keeps only a layer
        plan = dataclasses.replace(
            plan, offload="model" if need(plan) <= budget + weights - largest else "sequential", compile=False
        )
    return plan


def lower_plan(plan: MemoryPlan, batch: int, device: torch.device) -> MemoryPlan | None:
    """The next rung down after running out of memory, or None when nothing is left to try."""
    if not plan.vae_tiling:
        return dataclasses.replace(plan, vae_tiling=True)
    if not plan.vae_slicing:  # (attention stays: SDPA's kernels already never hold the full score matrix)
        return dataclasses.replace(plan, vae_slicing=True)
    # (offload's hooks and a compiled UNet exclude each other)
    if device.type == "cuda" and plan.offload == "none":
        return dataclasses.replace(plan, offload="model", compile=False)
    if device.type == "cuda" and plan.offload == "model":
        return dataclasses.replace(plan, offload="sequential")
    current = plan.max_batch or batch
    if current > 1:
        return dataclasses.replace(plan, max_batch=math.ceil(current / 2))
    return None


# -- recovering -------------------------------------------------------------------------------


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's and the CPU allocator's out-of-memory errors (and Python's MemoryError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text
    )


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; a few
    milliseconds). Freed CPU tensors otherwise stay in the process: the denoising loop's
    activations would lie under the VAE decode's, and peak memory would be their sum (SD 1.5 in
    bf16 at 512x512: 3.40 GB peak without, 3.17 GB with a trim before the decode). Nothing on
    other systems."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_memory(device: torch.device | None = None) -> None:
    """Collect garbage and give memory back: the C heap's free pages (:func:`trim_heap`) for the
    CPU, cached blocks for CUDA (after a failed attempt, outside its ``except`` block, when its
    frames and tensors are unreachable; after evicting a model). ``None``: whatever device the
    caller used, so both. The engine, the model cache and the generation stream use it; the engine
    also trims the heap alone before each VAE decode on the CPU."""
    gc.collect()
    if device is None or torch.device(device).type == "cpu":
        trim_heap()
    if (device is None or torch.device(device).type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


# -- applying ---------------------------------------------------------------------------------


def _components(bundle: ModelBundle) -> list[torch.nn.Module]:
    modules = [*bundle.text_encoders, bundle.unet, *bundle.controlnets.values(), bundle.vae]
    unique: dict[int, torch.nn.Module] = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            unique.setdefault(id(module), module)
    return list(unique.values())


@contextlib.contextmanager
def applied(bundle: ModelBundle, plan: MemoryPlan, device: torch.device) -> Iterator[None]:
    """Put ``plan`` on ``bundle`` for the ``with`` block, and restore the bundle afterwards (also
    after an error). The caller holds the bundle's lock (:func:`webui.engine.models.model_lock`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_attention(bundle, plan.attention))
        stack.enter_context(_vae_flags(bundle.vae, slicing=plan.vae_slicing, tiling=plan.vae_tiling))
        if plan.channels_last:
            _channels_last(bundle)
        if plan.offload != "none":
            stack.enter_context(_offloaded(bundle, device, sequential=plan.offload == "sequential"))
        yield


def _attention_modules(bundle: ModelBundle) -> list[Any]:
    modules = [bundle.unet, *bundle.controlnets.values(), bundle.vae]
    return [m for m in modules if hasattr(m, "set_attn_processor") and hasattr(m, "attn_processors")]


@contextlib.contextmanager
def _attention(bundle: ModelBundle, backend: str) -> Iterator[None]:
    """xformers or sliced attention in place of the standard processors for the ``with`` block.
    ``sdpa`` changes nothing: diffusers' standard processor already calls SDPA. Processors of
    other kinds (a model's own, an adapter's) are left as they are."""
    if backend == "sdpa":
        yield
        return
    from diffusers.models.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        SlicedAttnProcessor,
        XFormersAttnProcessor,
    )

    saved = []
    for module in _attention_modules(bundle):
        processors = dict(module.attn_processors)
        standard = [name for name, p in processors.items() if type(p) in (AttnProcessor, AttnProcessor2_0)]
        if not standard:
            continue
        wanted = dict(processors)
        for name in standard:
            # sliced: one head at a time, the lowest peak of the three
            wanted[name] = (
                XFormersAttnProcessor() if backend == "xformers" else SlicedAttnProcessor(slice_size=1)
            )
        saved.append((module, processors))
        module.set_attn_processor(wanted)
    try:
        yield
    finally:
        for module, processors in saved:
            module.set_attn_processor(processors)


@contextlib.contextmanager
def _vae_flags(vae: Any, *, slicing: bool, tiling: bool) -> Iterator[None]:
    before = (getattr(vae, "use_slicing", False), getattr(vae, "use_tiling", False))
    if hasattr(vae, "use_slicing"):
        vae.use_slicing = slicing
    if hasattr(vae, "use_tiling"):
        vae.use_tiling = tiling
    try:
        yield
    finally:
        if hasattr(vae, "use_slicing"):
            vae.use_slicing = before[0]
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = before[1]


def _channels_last(bundle: ModelBundle) -> None:
    to_channels_last([bundle.unet, *bundle.controlnets.values(), bundle.vae])


def to_channels_last(modules: Iterable[Any]) -> None:
    """The convolution weights of ``modules`` in channels-last layout (kept afterwards: the layout
    does not change results, and converting back and forth would cost a copy of the weights per
    request). Used by the plan's ``channels_last`` and by the CPU kernels for bfloat16 UNets."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; torch's overloads omit it


@contextlib.contextmanager
def _offloaded(bundle: ModelBundle, device: torch.device, *, sequential: bool) -> Iterator[None]:
    """Weights live in CPU memory and go to ``device`` only while they compute: a whole model at a
    time (the one before it goes back first), or with ``sequential`` one layer at a time. Inputs
    are moved to ``device`` as they enter a model or one of its parts (the VAE is called through
    ``encode``/``decode``, not ``forward``). Undone on exit: hooks removed, weights back."""
    storage = torch.device("cpu")
    components = _components(bundle)
    handles: list[Any] = []
    resident: list[torch.nn.Module | None] = [None]

    def to_device(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (list, tuple)):
            return type(value)(to_device(v) for v in value)
        if isinstance(value, dict):
            return {k: to_device(v) for k, v in value.items()}
        return value

    def entering(component: torch.nn.Module) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not sequential and resident[0] is not component:
                if resident[0] is not None:
                    resident[0].to(storage)
                component.to(device)
                resident[0] = component
            return to_device(args), to_device(kwargs)

        return hook

    def load_layer(layer: torch.nn.Module, _args: Any) -> None:
        layer.to(device)

    def unload_layer(layer: torch.nn.Module, _args: Any, _output: Any) -> None:
        layer.to(storage)

    for component in components:
        component.to(storage)
        for part in (component, *component.children()):
            handles.append(part.register_forward_pre_hook(entering(component), with_kwargs=True))
        if sequential:
            for layer in component.modules():
                if (
                    next(layer.parameters(recurse=False), None) is not None
                    or next(layer.buffers(recurse=False), None) is not None
                ):
                    handles.append(layer.register_forward_pre_hook(load_layer))
                    handles.append(layer.register_forward_hook(unload_layer))
    previous = bundle.execution_device
    bundle.execution_device = device
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bundle.execution_device = previous
        for component in components:
            component.to(device)
