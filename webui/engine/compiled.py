"""``--compile``: the UNet through ``torch.compile`` (TorchInductor), used only while it is exactly
the module that was compiled.

A compiled UNet runs the same operations with the small element-wise ones (group norm with its
activation, the residual additions, the attention's scaling) fused into generated kernels; the
convolutions, matrix products and attention stay oneDNN's, MKL's, cuDNN's. Its output agrees with
the eager UNet to float rounding (relative differences around 1e-5). The first call at a new size
or batch compiles, which takes seconds on a GPU and minutes on a CPU; the kernels are cached on disk
(``torch-compile/`` in the cache folder, :func:`webui.paths.cache_dir`, unless
``$TORCHINDUCTOR_CACHE_DIR`` says otherwise), so the next start finds them.

The compiled code does not see what is patched onto the UNet after it was compiled: hooks (a
memory plan's offload, a plugin's feature cache or token merging), replaced modules (LoRA adapter
layers), a ``forward`` put on the instance, other attention processors. So :meth:`CompiledUNets.route`
compares the UNet's structure with the structure it was compiled with, once per batch, and hands
back the eager UNet when anything differs. Weights changed in place need no such check: the compiled
code reads the parameters at every call (no "freezing", which would also hold a second copy of
every convolution's weights).

If compiling fails (no C++ compiler, an operation Inductor cannot handle), the UNet runs eagerly
from then on, with one warning in the log; the request itself is not failed.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from webui import paths
from webui.engine.memory import is_out_of_memory

__all__ = ["CACHE_SUBDIR", "CompiledUNets", "is_compile_error", "structure"]

log = logging.getLogger(__name__)

CACHE_SUBDIR = "torch-compile"
_ENTRIES = "_latent_studio_compiled"  # the UNet's attribute holding its compiled versions
# the attributes whose change makes a compiled graph stale: hooks and an instance-level forward
_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


def structure(module: torch.nn.Module) -> tuple[Any, ...]:
    """What a compiled graph of ``module`` depends on besides its parameters' values: every
    submodule's name, object and class, its hooks, a ``forward`` set on the instance, its attention
    processor. A walk over the modules, once per batch."""
    parts: list[Any] = []
    for name, sub in module.named_modules():
        hooks = tuple(tuple(getattr(sub, attr, {})) for attr in _HOOK_ATTRIBUTES)
        processor = getattr(sub, "processor", None)
        parts.append((name, id(sub), type(sub), hooks, "forward" in sub.__dict__, id(processor)))
    return tuple(parts)


def _looks_patched(parts: tuple[Any, ...]) -> bool:
    """Whether a structure shows a request's patch: hooks, a ``forward`` on an instance, adapter
    layers (peft's, as LoRAs are applied). A model between requests has none of them."""
    return any(
        any(hooks) or own_forward or kind.__module__.startswith("peft")
        for _name, _id, kind, hooks, own_forward, _processor in parts
    )


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from compiling (Dynamo's tracing, Inductor's code generation or
    the C++ / Triton compiler behind it) rather than from running the model."""
    if is_out_of_memory(error):
        return False
    kinds: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        kinds.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - every torch 2 has it
        pass
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:  # pragma: no cover - older torch
        pass
    return isinstance(error, tuple(kinds))


def use_cache_dir() -> str:
    """Point Inductor's on-disk cache at the app's cache folder (unless the user set
    ``$TORCHINDUCTOR_CACHE_DIR``) and return the folder. Torch itself writes its default (a folder
    in the temporary directory, which does not outlive a reboot) into the variable once it has
    looked, so that value counts as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(_torch_default_cache_dir()):
        folder = paths.cache_dir() / CACHE_SUBDIR
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - another torch layout: nothing to tell apart
        return ""
    return str(default_cache_dir())


@dataclass
class _Entry:
    structure: tuple[Any, ...]
    call: Callable[..., Any]
    failed: str | None = None
    calls: int = 0  # calls that ran the compiled code


@dataclass
class Route:
    """What one batch runs: ``call`` (the compiled UNet, or the module itself) and ``compiled``
    (whether it is the compiled one); ``reason``: why not, when it is not."""

    call: Callable[..., Any]
    compiled: bool
    reason: str = ""
    entry: _Entry | None = field(default=None, repr=False)

    def describe(self, note: str) -> str:
        """``note`` (a memory plan's description, which says "compiled UNet") as it really went:
        "UNet not compiled (...)" where the UNet ran uncompiled, also when compiling failed during
        the batch."""
        failed_now = self.compiled and self.entry is not None and self.entry.failed is not None
        if self.compiled and not failed_now:
            return note
        reason = "compiling failed" if failed_now else self.reason
        return note.replace("compiled UNet", f"UNet not compiled ({reason})")


class CompiledUNets:
    """The compiled UNets of one engine, one per UNet module. ``backend`` is ``torch.compile``'s
    (tests use ``"eager"``, which traces without generating code).

    The compiled module holds its UNet, so the entries are kept on the UNet itself (in a dictionary
    keyed weakly by this object) rather than here: an evicted model and its compiled code are freed
    together, and an engine that goes away takes its entries with it."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self._lock = threading.Lock()

    def _entries(self, unet: torch.nn.Module) -> weakref.WeakKeyDictionary[CompiledUNets, _Entry]:
        entries = unet.__dict__.get(_ENTRIES)
        if entries is None:
            entries = weakref.WeakKeyDictionary()
            object.__setattr__(unet, _ENTRIES, entries)  # not a submodule: nn.Module's setattr is bypassed
        return entries

    def route(self, unet: torch.nn.Module) -> Route:
        """The callable to run ``unet`` with for one batch: compiled when ``unet`` is as it was
        compiled (compiling it the first time), else ``unet`` itself with the reason."""
        current = structure(unet)
        with self._lock:
            entries = self._entries(unet)
            entry = entries.get(self)
            if entry is None:
                if _looks_patched(current):  # compile the UNet as it is between requests, not a patched one
                    return Route(unet, False, "patched for this request")
                entry = self._compile(unet, current)
                entries[self] = entry
        if entry.failed is not None:
            return Route(unet, False, "compiling failed", entry)
        if current != entry.structure:
            return Route(unet, False, "patched for this request", entry)
        return Route(self._guarded(unet, entry), True, entry=entry)

    def calls(self, unet: torch.nn.Module) -> int:
        """How many UNet calls ran compiled code (0 when ``unet`` was never compiled)."""
        entry = unet.__dict__.get(_ENTRIES, {}).get(self)
        return entry.calls if entry is not None else 0

    def _compile(self, unet: torch.nn.Module, current: tuple[Any, ...]) -> _Entry:
        if self.backend == "inductor":
            use_cache_dir()
        try:
            compiled = torch.compile(unet, backend=self.backend)
        except Exception as error:  # torch.compile itself refused (an unsupported platform)
            return _Entry(current, unet, failed=_first_line(error))
        return _Entry(current, compiled)

    @staticmethod
    def _guarded(unet: torch.nn.Module, entry: _Entry) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if entry.failed is None:
                try:
                    output = entry.call(*args, **kwargs)
                except Exception as error:
                    if not is_compile_error(error):
                        raise
                    entry.failed = _first_line(error)
                    log.warning(
                        "compiling the UNet failed (%s); it runs uncompiled from now on", entry.failed
                    )
                else:
                    entry.calls += 1
                    return output
            return unet(*args, **kwargs)

        return call


def _first_line(error: BaseException) -> str:
    """The root cause's type and first line ("RuntimeError: ..."): Dynamo wraps the compiler's error
    in one whose own first line names only the backend."""
    root = getattr(error, "inner_exception", None) or error.__cause__ or error
    text = (str(root).strip().splitlines() or [""])[0][:200]
    return f"{type(root).__name__}: {text}" if text else type(root).__name__
