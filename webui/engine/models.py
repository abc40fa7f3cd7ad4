"""Model choice per request: resolve a name, load it through the plugins, keep a few in a cache.

The cache is an ordinary object owned by an engine; a request names its model and gets it, and
nothing one request does changes the model another request sees.

Names and paths: a model is named as the listing shows it (``sub/name``), or by a path. Paths are
for the command line and Python callers; an engine serving the web (``allow_paths=False``) takes
names only, kept inside the model folders (see :mod:`webui.engine.folders`).
"""

from __future__ import annotations

import builtins
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from webui.engine.bundle import ModelBundle
from webui.engine.context import LoadContext, ModelEntry
from webui.engine.folders import HUB_ID, ModelFolders, check_name, model_hash
from webui.engine.memory import auto_dtype, release_memory
from webui.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, NoModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "latent-studio-shapes"  # the small model trained by this project, shipped in models/
_locks_guard = threading.Lock()
_module_locks: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


@contextmanager
def model_lock(bundle: ModelBundle) -> Iterator[None]:
    """Hold the locks of the bundle's UNet and text encoders: the modules a request's model patches
    (``patch_model``: LoRAs, embeddings) change. The engine holds it for the whole generation,
    patches or not, so two generations on one cached model never see each other's patches.

    The locks belong to the module objects, not to the bundle, so bundles that share modules (a copy
    of a bundle with another VAE, a refiner that shares a text encoder) also share them, whether or
    not they are in a cache. Reentrant; taken in a fixed order, so two holders never deadlock."""
    modules = {id(m): m for m in (bundle.unet, *bundle.text_encoders) if isinstance(m, torch.nn.Module)}
    locks = []
    with _locks_guard:
        for key in sorted(modules):
            lock = _module_locks.get(modules[key])
            if lock is None:
                lock = _module_locks[modules[key]] = threading.RLock()
            locks.append(lock)
    with ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        yield


NO_MODEL_HELP = (
    "no model is installed: put a diffusers model folder (with model_index.json) into {models_dir}, "
    "or a .safetensors checkpoint into its checkpoints/ folder, or pass --model with a folder path or "
    "a Hugging Face id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (downloaded once, needs internet)"
)


class ModelManager:
    """Loads models through the ``load_model`` hook and caches the most recently used ones.

    ``models_dir`` and ``extra_models_dirs`` are the models roots (an A1111 or ComfyUI ``models``
    folder works as it is). ``allow_paths=False`` refuses request names that are paths or lead
    outside those folders (the web server's setting); ``default_model`` is trusted either way,
    since it comes from whoever started the program. ``hash_cache`` is the JSON file that keeps
    single-file checkpoints' sha256 (default: see :func:`webui.engine.folders.default_cache_dir`).
    """

    def __init__(
        self,
        plugins: Any,
        *,
        models_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        auto_dtype: bool = False,
        default_model: str | None = None,
        cache_size: int = 2,
        allow_download: bool = True,
        extra_models_dirs: Iterable[str | Path] = (),
        allow_paths: bool = True,
        hash_cache: str | Path | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.plugins = plugins
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.extra_models_dirs = [Path(d) for d in extra_models_dirs]
        self.allow_paths = allow_paths
        self.hash_cache = hash_cache
        self.allow_pickle = allow_pickle  # pickle checkpoints may be read (weights only): --allow-pickle
        self.device = torch.device(device)
        self.dtype = dtype
        # True: a loaded checkpoint may go on to the dtype webui.engine.memory.auto_dtype picks for it
        self.auto_dtype = auto_dtype
        self.default_model = default_model
        self.cache_size = max(1, cache_size)
        self.allow_download = allow_download
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pinned: dict[tuple[str, str], Any] = {}
        self._sources: dict[tuple[str, str, bool], str] = {}
        self._lock = threading.RLock()

    # -- listing ------------------------------------------------------------------------------

    @property
    def folders(self) -> ModelFolders:
        """The models roots and their kind folders (checkpoints/, vae/, lora/... and aliases)."""
        return ModelFolders.of(self.models_dir, *self.extra_models_dirs)

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        """Every model the plugins offer (rescanned on each call), plus models added in code and
        the ``default_model`` when it is a path outside the folders (listed by that path)."""
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
            register=register,
            models_dir=str(self.models_dir) if self.models_dir else None,
            models_dirs=[str(root) for root in self.folders.roots],
        )
        default = self._default_entry(entries, seen)
        if default is not None:
            entries.insert(len(self._pinned), default)
        return [e for e in entries if kind is None or e.kind == kind]

    def _default_entry(
        self, entries: builtins.list[ModelEntry], seen: set[tuple[str, str]]
    ) -> ModelEntry | None:
        """The command line's ``--model`` path as an entry, unless a listed entry is that model."""
        if not self.default_model or ("checkpoint", self.default_model) in seen:
            return None
        path = Path(self.default_model).expanduser()
        if not path.exists():
            return None  # a name or a hub id: nothing to add
        real = path.resolve()
        for entry in entries:
            if entry.kind == "checkpoint" and Path(entry.source).expanduser().resolve() == real:
                return None
        return ModelEntry(name=self.default_model, source=str(real), kind="checkpoint")

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
        trusted = not name or name == self.default_model  # the default comes from the command line
        return self._get(self.resolve(name), "checkpoint", trusted=trusted)

    def get_controlnet(self, name: str) -> Any:
        return self._get(name, "controlnet")

    def get_vae(self, name: str) -> Any:
        """A separate VAE (``models/vae``), loaded through the ``load_model`` hook with kind "vae"."""
        return self._get(name, "vae")

    def source_of(self, name: str, kind: str = "checkpoint") -> str:
        """What ``load_model`` receives for a request's ``name`` (a listed model's source, a path
        inside the folders, or a hub id), under this manager's ``allow_paths`` rule. Unsafe names
        raise :class:`InvalidRequestError`, missing ones :class:`ModelNotFoundError`."""
        return self._source_of(name, kind, self.allow_paths)

    def _get(self, name: str, kind: str, *, trusted: bool = False) -> Any:
        if (kind, name) in self._pinned:
            return self._pinned[(kind, name)]
        permissive = trusted or self.allow_paths
        with self._lock:
            source = self._sources.get((kind, name, permissive))
            if source is None:
                source = self._source_of(name, kind, permissive)
                self._sources[(kind, name, permissive)] = source
            key = (kind, source)  # a name and its folder path share one cache entry
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            while len(self._cache) >= self.cache_size:  # make room first: a GPU may fit only one model
                self._cache.popitem(last=False)
                release_memory(self.device)
            context = LoadContext(
                models_dir=str(self.models_dir) if self.models_dir else None,
                device=self.device,
                dtype=self.dtype,
                allow_download=self.allow_download,
                allow_paths=permissive,
                allow_pickle=self.allow_pickle,
            )
            model = self.plugins.hook.load_model(source=source, kind=kind, context=context)
            if model is None:
                raise ModelNotFoundError(
                    f"no {kind} found for {source!r}: not a model folder, file or known name"
                )
            if kind == "checkpoint" and not isinstance(model, ModelBundle):
                raise ModelLoadError(
                    f"the loader for {source!r} returned {type(model).__name__}, not a ModelBundle"
                )
            if kind == "checkpoint" and self.auto_dtype:
                _to_auto_dtype(model, self.device)
            if kind == "checkpoint" and model.model_hash is None and Path(source).is_file():
                model.model_hash = model_hash(source, cache=self.hash_cache)  # A1111's sha256 shorthash
            self._cache[key] = model
            return model

    def _source_of(self, name: str, kind: str, permissive: bool) -> str:
        """What to load for ``name``: a listed model's source; when ``permissive``, an existing
        path (made absolute, so that two spellings of one folder are one model); a model found
        inside the folders; else a hub id, or (when ``permissive``) the name for the loaders to
        judge. Not ``permissive``: paths and names leading outside the folders are refused."""
        for entry in self.list(kind):
            if name in (entry.name, entry.source):  # a listed model (its source is a checked one)
                path = Path(entry.source).expanduser()
                return str(path.resolve()) if path.exists() else entry.source
        if permissive:
            path = Path(name).expanduser()
            if path.exists():
                return str(path.resolve())
        else:
            check_name(name, kind)
        try:
            return str(self.folders.find(name, kind))
        except InvalidRequestError:
            if not permissive:
                raise  # e.g. a symbolic link that leads outside the folders
            return name
        except ModelNotFoundError:
            if permissive:
                return name
        if HUB_ID.match(name) and self.allow_download and not Path(name).exists():
            return name  # downloaded by the loader into the Hugging Face cache
        refused = (
            (
                " (downloading it is not allowed here; the server owner can allow downloads with "
                "--allow-download)"
            )
            if HUB_ID.match(name) and not self.allow_download
            else ""
        )
        raise ModelNotFoundError(f"no {kind} named {name!r} in the model folders{refused}")

    def lock(self, bundle: ModelBundle) -> Any:
        """The lock a request holds while it patches and uses ``bundle`` (see :func:`model_lock`);
        a context manager."""
        return model_lock(bundle)

    def clear(self) -> None:
        """Forget loaded models and resolved names (after models were added or moved)."""
        with self._lock:
            self._cache.clear()
            self._sources.clear()
        release_memory(self.device)


def _to_auto_dtype(bundle: ModelBundle, device: torch.device) -> None:
    wanted = auto_dtype(device, sum(p.numel() for p in bundle.unet.parameters()))
    if wanted != bundle.dtype:
        log.info("%s: computing in %s", bundle.name, str(wanted).removeprefix("torch."))
        bundle.to(dtype=wanted)
