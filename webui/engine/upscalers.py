"""Image upscalers: Lanczos and Nearest (no file), and model files (ESRGAN, Real-ESRGAN, SwinIR, DAT...)
loaded with spandrel, run in tiles so that a large image fits in memory.

The engine holds one :class:`UpscalerRegistry` as ``engine.upscalers``. Its list comes from the
``register_upscalers(register, models_dirs)`` hook, asked again on every :meth:`~UpscalerRegistry.names`
(a cheap directory scan), so a file dropped into ``models/upscalers`` shows after a refresh. The
built-in plugin registers Lanczos, Nearest and every file of the upscaler folders (``upscalers/``,
A1111's ``ESRGAN/``, ``RealESRGAN/``, ``SwinIR/``, ``DAT/``, ComfyUI's ``upscale_models/``).

A model runs at its own scale (4x for most), again if the target is still larger, then the result is
resized with Lanczos to the exact target. The target's pixels are checked against the engine's
limits (``--max-pixels``) before anything is loaded or computed.

Files follow the checkpoints' rules: ``.safetensors`` is checked before it is read
(:mod:`webui.engine.files`); pickles (``.pth``, ``.pt``, ``.ckpt``) are read only when the engine
allows them (``--allow-pickle``), and then with ``torch.load(weights_only=True)``.

Tiles: the image is cut into tiles of at most ``tile`` input pixels a side; each tile is computed
with ``overlap`` pixels of its neighbours around it and only its centre is kept, so the seams vanish
when the model looks no further than ``overlap`` pixels (the tiny test models), and are far below
one grey level for real ones at the default 32.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from webui.engine.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_state_dict, pickle_refusal
from webui.engine.memory import is_out_of_memory, release_memory
from webui.errors import InvalidRequestError, LatentStudioError, ModelLoadError, OutOfMemoryError, PluginError
from webui.images import normalize_image, scaled_size
from webui.limits import check_total

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "UPSCALER_SUFFIXES",
    "UpscalerRegistry",
    "UpscalerSpec",
    "target_size",
    "upscale_tensor",
]

log = logging.getLogger(__name__)

DEFAULT_TILE = 512
"""Input pixels per tile side: a 4x model's 512x512 tile fits in a few GB even in float32."""
DEFAULT_OVERLAP = 32
"""Context pixels around each tile (computed, then dropped)."""
UPSCALER_SUFFIXES = (SAFETENSORS_SUFFIX, ".pth", ".pt", ".ckpt")
MAX_PASSES = 4  # a model pass repeated at most this often (4x four times is 256x)
MIN_TILE = 64  # the out-of-memory ladder halves the tile down to this
SPANDREL_REQUIREMENT = "spandrel>=0.4,<0.5"

Resample = Callable[[Image.Image, tuple[int, int]], Image.Image]


@dataclass(frozen=True)
class UpscalerSpec:
    """A registered upscaler: a ``resample(image, (width, height))`` function, or a model file."""

    name: str
    resample: Resample | None = None
    path: Path | None = None
    scale: float | None = None  # the nominal scale, for listings (a model's own is known once loaded)

    @property
    def is_model(self) -> bool:
        return self.path is not None


def target_size(
    width: int, height: int, *, scale: float | None = None, size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The output size for an image of ``width`` x ``height``: times ``scale``, or ``size``
    (exactly one of them). Bad values: :class:`InvalidRequestError`."""
    if (scale is None) == (size is None):
        raise InvalidRequestError("give either a scale or a target size for the upscale, not both or neither")
    if scale is not None:
        return scaled_size(width, height, scale)
    assert size is not None
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"the target size must be two whole numbers (width, height), got {size!r}"
        ) from None
    if w <= 0 or h <= 0 or (w, h) != tuple(size):
        raise InvalidRequestError(f"the target size must be two whole numbers above 0, got {size!r}")
    return w, h


def upscale_tensor(
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``run`` (a model: ``(1, C, h, w)`` in ``[0, 1]`` to ``(1, C', h*scale, w*scale)``) over
    ``image`` in tiles of at most ``tile`` pixels a side, each with ``overlap`` pixels of context
    that are computed and dropped. ``tile <= 0``: the whole image at once. Tiles go to ``device`` /
    ``dtype`` (default: the image's); the result is float32 on the image's device."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidRequestError(f"expected one image as a (1, C, H, W) tensor, got {tuple(image.shape)}")
    if overlap < 0:
        raise InvalidRequestError(f"the tile overlap must be 0 or more, got {overlap}")
    device = device or image.device
    dtype = dtype or image.dtype
    _, _, height, width = image.shape
    if tile <= 0 or (height <= tile and width <= tile):
        return run(image.to(device=device, dtype=dtype)).to(device=image.device, dtype=torch.float32)
    core = tile - 2 * overlap
    if core < 8:
        raise InvalidRequestError(
            f"the tile size ({tile}) must be at least twice the overlap ({overlap}) plus 8 pixels"
        )
    out: torch.Tensor | None = None
    for top in range(0, height, core):
        for left in range(0, width, core):
            bottom, right = min(top + core, height), min(left + core, width)
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
            piece = run(image[:, :, y0:y1, x0:x1].to(device=device, dtype=dtype))
            expected = ((y1 - y0) * scale, (x1 - x0) * scale)
            if tuple(piece.shape[-2:]) != expected:
                raise ModelLoadError(
                    f"the upscaler returned a {tuple(piece.shape[-2:])} tile for a {(y1 - y0, x1 - x0)} input; "
                    f"expected {expected} at its scale {scale}"
                )
            if out is None:
                out = torch.zeros(
                    (1, piece.shape[1], height * scale, width * scale),
                    dtype=torch.float32,
                    device=image.device,
                )
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = piece[
                :,
                :,
                (top - y0) * scale : (bottom - y0) * scale,
                (left - x0) * scale : (right - x0) * scale,
            ].to(device=image.device, dtype=torch.float32)
            del piece
    assert out is not None
    return out


class UpscalerRegistry:
    """Name -> upscaler, for one engine. Names match exactly, else case-insensitively.

    ``names()`` lists Lanczos, Nearest and the model files (asking the plugins afresh);
    ``upscale(image, name, scale=... | size=...)`` returns an RGB image of exactly the target size.
    Loaded models are kept in a small LRU cache (``cache_size``). ``tile`` and ``overlap`` are the
    defaults for model upscalers (each call may override them).
    """

    def __init__(
        self,
        engine: Any,
        *,
        cache_size: int = 2,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
    ) -> None:
        self.engine = engine
        self.cache_size = max(1, cache_size)
        self.tile = tile
        self.overlap = overlap
        self._cache: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        self._lock = threading.RLock()

    # -- the list ------------------------------------------------------------------------------

    def specs(self) -> list[UpscalerSpec]:
        """Every registered upscaler, in registration order (the first of a name wins)."""
        found: dict[str, UpscalerSpec] = {}

        def register(
            name: str,
            *,
            resample: Resample | None = None,
            path: str | Path | None = None,
            scale: float | None = None,
        ) -> None:
            if not isinstance(name, str) or not name.strip() or name.strip().lower() == "none":
                raise PluginError(f"upscaler name must be a non-empty text other than 'None', got {name!r}")
            if (resample is None) == (path is None):
                raise PluginError(f"upscaler {name!r}: register it with either resample=... or path=...")
            if resample is not None and not callable(resample):
                raise PluginError(f"upscaler {name!r}: resample must be callable")
            key = name.lower()
            if key not in found:
                found[key] = UpscalerSpec(
                    name=name, resample=resample, path=Path(path) if path is not None else None, scale=scale
                )

        plugins = self.engine.plugins
        plugins.hook.register_upscalers(register=register, models_dirs=self._roots())
        return list(found.values())

    def _roots(self) -> list[str]:
        models = getattr(self.engine, "models", None)
        if models is None:
            return []
        return [str(root) for root in models.folders.roots]

    def names(self) -> list[str]:
        """The upscalers' names: Lanczos, Nearest, then one per model file (rescanned)."""
        return [spec.name for spec in self.specs()]

    def get(self, name: str) -> UpscalerSpec:
        """The upscaler called ``name``; one line naming the known ones when there is none."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError(f"upscaler name must be a non-empty text, got {name!r}")
        specs = self.specs()
        for spec in specs:
            if spec.name == name:
                return spec
        for spec in specs:
            if spec.name.lower() == name.lower():
                return spec
        if any(mark in name for mark in ("/", "\\", "..")) or name.startswith("~") or ":" in name[:3]:
            raise InvalidRequestError(
                f"upscaler name {name!r} is not allowed: upscalers are chosen by their listed name, not by a path"
            )
        known = ", ".join(spec.name for spec in specs) or "none"
        raise InvalidRequestError(f"unknown upscaler {name!r}; available: {known}")

    # -- upscaling -----------------------------------------------------------------------------

    def upscale(
        self,
        image: Image.Image,
        name: str,
        *,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        tile: int | None = None,
        overlap: int | None = None,
    ) -> Image.Image:
        """``image`` upscaled by ``name`` to ``scale`` times its size or to ``size`` (exactly one),
        as RGB. The target is checked against the engine's pixel limit before any work."""
        if not isinstance(image, Image.Image):
            raise InvalidRequestError(f"expected a PIL image to upscale, got {type(image).__name__}")
        width, height = target_size(image.width, image.height, scale=scale, size=size)
        limits = getattr(self.engine, "limits", None)
        check_total(
            f"the upscaled image would be {width}x{height} = {width * height} pixels",
            width * height,
            limits.max_pixels if limits is not None else 0,
            "max_pixels",
        )
        spec = self.get(name)
        picture = normalize_image(image, "the image to upscale")
        if spec.resample is not None:
            result = spec.resample(picture, (width, height))
            if not isinstance(result, Image.Image):
                raise PluginError(f"upscaler {spec.name!r} returned {type(result).__name__}, not an image")
            return _exact(result.convert("RGB"), (width, height))
        if width <= picture.width and height <= picture.height:
            return _exact(picture, (width, height))  # not larger: a model would add nothing
        model = self.load(spec)
        return self._run_model(
            model,
            picture,
            (width, height),
            tile=self.tile if tile is None else tile,
            overlap=self.overlap if overlap is None else overlap,
        )

    def load(self, spec: UpscalerSpec | str) -> Any:
        """The spandrel model descriptor of a model upscaler (loaded once, then cached)."""
        if isinstance(spec, str):
            spec = self.get(spec)
        if spec.path is None:
            raise InvalidRequestError(f"upscaler {spec.name!r} has no model file")
        path = spec.path
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelLoadError(
                f"upscaler {spec.name!r}: cannot read {path.name}: {exc.strerror or exc}"
            ) from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            while len(self._cache) >= self.cache_size:
                self._cache.popitem(last=False)
                release_memory(self._device())
            model = self._read(spec.name, path)
            self._cache[key] = model
            return model

    def clear(self) -> None:
        """Forget the loaded models."""
        with self._lock:
            self._cache.clear()
        release_memory(self._device())

    def _device(self) -> torch.device:
        return torch.device(getattr(self.engine, "device", "cpu"))

    def _allow_pickle(self) -> bool:
        models = getattr(self.engine, "models", None)
        return bool(getattr(models, "allow_pickle", False))

    def _read(self, name: str, path: Path) -> Any:
        state = read_upscaler_state(path, allow_pickle=self._allow_pickle())
        spandrel = import_spandrel()
        try:
            descriptor = spandrel.ModelLoader().load_from_state_dict(state)
        except spandrel.UnsupportedModelError:
            raise ModelLoadError(
                f"{path.name} is not an upscaler model this program knows: no supported architecture "
                "matches its weights"
            ) from None
        except Exception as exc:  # a known architecture with odd shapes, or damaged weights
            raise ModelLoadError(f"{path.name} cannot be loaded as an upscaler: {_first_line(exc)}") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ModelLoadError(
                f"{path.name} is a {descriptor.architecture.name} model, not an image upscaler"
            )
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ModelLoadError(
                f"{path.name} takes {descriptor.input_channels} and gives {descriptor.output_channels} channels; "
                "an upscaler for colour images takes and gives 3"
            )
        device = self._device()
        dtype = _model_dtype(descriptor, device, getattr(self.engine, "dtype", torch.float32))
        descriptor.to(device, dtype)
        descriptor.eval()
        log.info(
            "upscaler %s: %s, %dx, on %s in %s",
            name,
            descriptor.architecture.name,
            descriptor.scale,
            device,
            dtype,
        )
        return descriptor

    def _run_model(
        self, model: Any, image: Image.Image, size: tuple[int, int], *, tile: int, overlap: int
    ) -> Image.Image:
        scale = int(model.scale)
        device = self._device()
        dtype = next(model.model.parameters()).dtype
        current = image
        try:
            for _ in range(MAX_PASSES):
                current = self._one_pass(model, current, scale, device, dtype, tile, overlap)
                if scale <= 1 or (current.width >= size[0] and current.height >= size[1]):
                    break
        finally:
            release_memory(device)
        return _exact(current, size)

    def _one_pass(
        self,
        model: Any,
        image: Image.Image,
        scale: int,
        device: torch.device,
        dtype: torch.dtype,
        tile: int,
        overlap: int,
    ) -> Image.Image:
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        while True:
            failed = None
            try:
                with torch.inference_mode():
                    out = upscale_tensor(
                        model, tensor, scale, tile=tile, overlap=overlap, device=device, dtype=dtype
                    )
                break
            except LatentStudioError:
                raise
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise ModelLoadError(
                        f"the upscaler failed: {type(exc).__name__}: {_first_line(exc)}"
                    ) from None
                failed = exc
            del failed  # out of the except block: its frames and tensors can go
            release_memory(device)
            smaller = (tile if tile > 0 else max(image.size)) // 2
            if smaller < max(MIN_TILE, 2 * overlap + 8):
                raise OutOfMemoryError(
                    f"upscaling a {image.width}x{image.height} image ran out of memory even with "
                    f"{max(MIN_TILE, 2 * overlap + 8)}-pixel tiles"
                )
            log.warning("upscaler ran out of memory with %s-pixel tiles; trying %s", tile or "whole", smaller)
            tile = smaller
        array = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        return Image.fromarray(array, "RGB")


def _exact(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _model_dtype(descriptor: Any, device: torch.device, wanted: torch.dtype) -> torch.dtype:
    if device.type == "cpu" or wanted == torch.float32:
        return torch.float32
    if wanted == torch.float16 and descriptor.supports_half:
        return torch.float16
    if wanted == torch.bfloat16 and descriptor.supports_bfloat16:
        return torch.bfloat16
    return torch.float32


def read_upscaler_state(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file: ``.safetensors`` checked before it is read; a pickle only
    with ``allow_pickle`` (weights only), unwrapped from ``params_ema``/``params``/``state_dict``."""
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state = load_state_dict(path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(pickle_refusal(path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelLoadError(f"upscaler file not found: {path.name}") from None
        except Exception as exc:
            raise ModelLoadError(
                f"{path.name} cannot be read as plain weights (torch.load with weights_only=True refused it: "
                f"{_first_line(exc)})"
            ) from None
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{path.name} does not hold a state dict (found {type(obj).__name__})")
        state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise ModelLoadError(
            f"{path.name}: not an upscaler file ({suffix or 'no suffix'}); expected one of {', '.join(UPSCALER_SUFFIXES)}"
        )
    if not state:
        raise ModelLoadError(f"{path.name} holds no tensors")
    return state


_SPANDREL_LOCK = threading.Lock()


def import_spandrel() -> Any:
    """The ``spandrel`` module, or :class:`ModelLoadError` saying how to install it.

    spandrel imports torchvision for two architectures that are not upscalers (LaMa inpainting and
    RestoreFormer face restoration), and only calls it inside them. Where torchvision is missing, or
    is a build that does not load beside this torch (PyPI's CUDA torchvision beside a CPU-only
    torch), those three functions are stood in for while spandrel is imported (calling them fails),
    and torchvision's modules are put back as they were, so that nothing else sees the stand-in.
    """
    module = sys.modules.get("spandrel")
    if module is not None and hasattr(module, "ModelLoader"):
        return module
    with _SPANDREL_LOCK:
        try:
            import spandrel

            return spandrel
        except ModuleNotFoundError as exc:
            if exc.name == "spandrel":
                raise ModelLoadError(
                    f"model upscalers need the spandrel package: pip install '{SPANDREL_REQUIREMENT}'"
                ) from None
            if not (exc.name or "").startswith("torchvision"):
                raise ModelLoadError(f"spandrel cannot be imported: {_first_line(exc)}") from None
        except Exception as exc:  # torchvision present but broken (e.g. built for another torch)
            if "torchvision" not in _traceback_modules(exc):
                raise ModelLoadError(f"spandrel cannot be imported: {_first_line(exc)}") from None
            log.info("torchvision does not load (%s); importing spandrel without it", _first_line(exc))
        with _without_torchvision():
            try:
                import spandrel
            except Exception as exc:
                raise ModelLoadError(f"spandrel cannot be imported: {_first_line(exc)}") from None
        return spandrel


def _traceback_modules(exc: BaseException) -> str:
    names = []
    tb = exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return " ".join(names) + " " + str(exc)


@contextmanager
def _without_torchvision() -> Iterator[None]:
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for key in list(saved):
        del sys.modules[key]
    for key in [k for k in sys.modules if k == "spandrel" or k.startswith("spandrel.")]:
        del sys.modules[key]  # a half-done import from the first try

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError("this model needs torchvision, which is not installed for this torch")

    class InterpolationMode:
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = unavailable  # type: ignore[attr-defined]
    functional.normalize = unavailable  # type: ignore[attr-defined]
    root.transforms = transforms  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    stand_ins = {
        "torchvision": root,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for key in stand_ins:
            if sys.modules.get(key) is stand_ins[key]:
                del sys.modules[key]
        sys.modules.update(saved)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300].strip() if lines else type(exc).__name__
