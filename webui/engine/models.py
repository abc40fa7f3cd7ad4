"""Model choice per request: resolve a name, load it through the plugins, keep a few in a cache.

The cache is an ordinary object owned by an engine; a request names its model and gets it, and
nothing one request does changes the model another request sees.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from webui.engine.bundle import ModelBundle
from webui.engine.context import LoadContext, ModelEntry
from webui.errors import ModelLoadError, ModelNotFoundError, NoModelError

DEFAULT_MODEL = "latent-studio-shapes"  # the small model trained by this project, shipped in models/
NO_MODEL_HELP = (
    "no model is installed: put a diffusers model folder (with model_index.json) into {models_dir}, "
    "or pass --model with a folder path or a Hugging Face id such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5 (downloaded once, needs internet)"
)


class ModelManager:
    """Loads models through the ``load_model`` hook and caches the most recently used ones."""

    def __init__(
        self,
        plugins: Any,
        *,
        models_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        default_model: str | None = None,
        cache_size: int = 2,
        allow_download: bool = True,
    ) -> None:
        self.plugins = plugins
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.device = torch.device(device)
        self.dtype = dtype
        self.default_model = default_model
        self.cache_size = max(1, cache_size)
        self.allow_download = allow_download
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pinned: dict[tuple[str, str], Any] = {}
        self._sources: dict[tuple[str, str], str] = {}
        self._lock = threading.RLock()

    # -- listing ------------------------------------------------------------------------------

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        """Every model the plugins offer (rescanned on each call), plus models added in code."""
        entries: list[ModelEntry] = []
        seen: set[tuple[str, str]] = set()

        def register(entry: ModelEntry) -> None:
            if not isinstance(entry, ModelEntry):
                raise TypeError(f"register_models must register ModelEntry objects, got {entry!r}")
            if (entry.kind, entry.name) not in seen:
                seen.add((entry.kind, entry.name))
                entries.append(entry)

        for (entry_kind, name), _ in self._pinned.items():
            register(ModelEntry(name=name, source=name, kind=entry_kind))
        self.plugins.hook.register_models(
            register=register, models_dir=str(self.models_dir) if self.models_dir else None
        )
        return [e for e in entries if kind is None or e.kind == kind]

    # -- loading ------------------------------------------------------------------------------

    def add(self, name: str, model: Any, kind: str = "checkpoint") -> None:
        """Make an already built model (a ModelBundle or a ControlNet) available under ``name``."""
        if kind == "checkpoint" and isinstance(model, ModelBundle):
            model.name = model.name or name
        self._pinned[(kind, name)] = model

    def resolve(self, name: str | None) -> str:
        """The source string for a request's model name. ``None`` means the default model: the
        engine's ``default_model``, else the shipped shapes model, else the first model listed."""
        if name:
            return name
        if self.default_model:
            return self.default_model
        if self.models_dir is not None and (self.models_dir / DEFAULT_MODEL / "model_index.json").is_file():
            return str(self.models_dir / DEFAULT_MODEL)
        entries = self.list("checkpoint")
        if entries:
            return entries[0].source
        raise NoModelError(NO_MODEL_HELP.format(models_dir=self.models_dir or "models/"))

    def get(self, name: str | None = None) -> ModelBundle:
        """The model bundle for ``name`` (loaded on first use, then cached)."""
        return self._get(self.resolve(name), "checkpoint")

    def get_controlnet(self, name: str) -> Any:
        return self._get(name, "controlnet")

    def _get(self, name: str, kind: str) -> Any:
        if (kind, name) in self._pinned:
            return self._pinned[(kind, name)]
        with self._lock:
            source = self._sources.get((kind, name))
            if source is None:
                source = self._source_of(name, kind)
                self._sources[(kind, name)] = source
            key = (kind, source)  # a name and its folder path share one cache entry
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            while len(self._cache) >= self.cache_size:  # make room first: a GPU may fit only one model
                self._cache.popitem(last=False)
                _free_memory(self.device)
            context = LoadContext(
                models_dir=str(self.models_dir) if self.models_dir else None,
                device=self.device,
                dtype=self.dtype,
                allow_download=self.allow_download,
            )
            model = self.plugins.hook.load_model(source=source, kind=kind, context=context)
            if model is None:
                raise ModelNotFoundError(f"no {kind} found for {source!r}: not a model folder, file or known name")
            if kind == "checkpoint" and not isinstance(model, ModelBundle):
                raise ModelLoadError(f"the loader for {source!r} returned {type(model).__name__}, not a ModelBundle")
            self._cache[key] = model
            return model

    def _source_of(self, name: str, kind: str) -> str:
        """What to load for ``name``: a listed model's source, else the name itself (an existing
        path made absolute, so that two spellings of one folder are one model)."""
        for entry in self.list(kind):
            if entry.name == name:
                name = entry.source
                break
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    def clear(self) -> None:
        """Forget loaded models and resolved names (after models were added or moved)."""
        with self._lock:
            self._cache.clear()
            self._sources.clear()
        _free_memory(self.device)


def short_hash(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """First 10 hex digits of the file's sha256 (what A1111 prints as "Model hash")."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
