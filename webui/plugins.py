"""Building a plugin manager: built-ins, pip-installed plugins, drop-in modules.

There is no global plugin manager: :func:`make_plugin_manager` builds a fresh one each time (each
engine, each test). Community plugins are found two ways:

* **installed packages** that declare an entry point in the ``latent_studio`` group::

      [project.entry-points.latent_studio]
      my_plugin = "my_package.plugin"

* **drop-in modules**: ``*.py`` files in the ``plugins/`` folder next to ``launch.py`` (or any
  folder passed in ``plugin_dirs``, or listed in the ``LATENT_STUDIO_PLUGIN_DIRS`` environment
  variable, separated like ``PATH``, which then replaces ``plugins/``).

A plugin cannot take the app down:

* each is imported on its own, catching everything it raises (also ``SystemExit``; only
  ``KeyboardInterrupt`` goes through): a broken plugin is recorded (name and error), logged, listed
  by ``launch.py plugins`` and in the web app, and every other plugin still loads;
* its start-up hooks (:data:`STARTUP_HOOKS`) are guarded: when one fails, the failure is recorded
  and logged with the plugin's name, the call answers ``None`` and everything else goes on;
* an installed or drop-in plugin's request hooks raise :class:`~webui.errors.PluginError`
  naming the plugin and the hook (``plugin 'plugins/bad.py' failed in provide_conditioning:
  ValueError: boom``) instead of whatever the plugin raised. Errors meant for the user
  (:class:`~webui.errors.LatentStudioError`), running out of memory (retried by the engine) and
  an interrupt go through unchanged. Built-ins and plugins registered in code (``extra``) are
  part of the host program and keep their own exceptions.

Both guards wrap each hook implementation's function when the plugin is registered, so every
caller of ``pm.hook.<name>(...)`` gets them. Wrapper implementations (``hookwrapper=True`` or
``wrapper=True``) are left as they are.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from webui import hookspecs
from webui.errors import LatentStudioError, PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLUGIN_DIR = REPO_ROOT / "plugins"
PLUGIN_DIRS_ENV = "LATENT_STUDIO_PLUGIN_DIRS"  # drop-in folders instead of plugins/ (os.pathsep-separated)
# hooks called while an engine or the web app starts (or a model list is refreshed): a failure
# there is recorded and skipped; every other hook runs during a request
STARTUP_HOOKS = frozenset({"startup", "register_schedulers", "register_models", "register_ui_tabs"})
GUARDED_SOURCES = frozenset({"entrypoint", "dropin"})  # whose request-hook errors become PluginError
MAX_MESSAGE = 300  # characters of a plugin's error message kept in a record or a PluginError
API_VERSION = 1  # the plugin API this program provides (re-exported as webui.api.API_VERSION)
API_ATTRIBUTE = "LATENT_STUDIO_API"  # a plugin's declaration of the API versions it supports

BUILTIN_PLUGINS: tuple[str, ...] = (
    "webui.builtin.schedulers",
    "webui.builtin.loaders",
    "webui.builtin.single_file",
    "webui.builtin.vae",
    "webui.builtin.metadata",
    "webui.builtin.text",
    "webui.builtin.embeddings",  # before lora: its provide_conditioning (trylast) runs after lora's
    "webui.builtin.lora",
    "webui.builtin.cfg_rescale",
    "webui.builtin.init_image",
    "webui.builtin.masked_image",
    "webui.builtin.segmap",
    "webui.builtin.ui_tabs",
)


@dataclass
class PluginRecord:
    """What is known about one plugin: where it came from and whether it loaded."""

    name: str
    source: str  # "builtin", "entrypoint", "dropin" or "extra" (registered in code)
    version: str | None = None
    error: str | None = None  # why it failed to load, or which start-up hooks failed (one line)
    module: ModuleType | None = field(default=None, repr=False)


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers plugins that failed, and guards their hooks (see the
    module's docstring)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._source = "extra"  # the source of the plugin being registered

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """pluggy's ``register``, then each of the plugin's hook functions wrapped in its guard."""
        registered = super().register(plugin, name)
        if registered is not None:
            for caller in self.get_hookcallers(plugin) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:
                        self._guard(impl, caller.name, self._source)
        return registered

    def register_plugin(self, plugin: Any, name: str, *, source: str, version: str | None = None) -> None:
        """Register ``plugin`` under ``name``; a failure is recorded instead of raised, and so is a
        plugin written for other API versions (see :func:`api_mismatch`), which is not registered."""
        mismatch = api_mismatch(plugin)
        if mismatch is not None:
            self.records[name] = PluginRecord(name, source, version, mismatch)
            log.warning("plugin %r was not loaded: %s", name, mismatch)
            return
        self._source = source
        try:
            self.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin with a malformed hook (or a hostile attribute)
            self.record_failure(name, source, exc, version, when="at registration", where=False)
        else:
            self.records[name] = PluginRecord(name, source, version, None, plugin)
        finally:
            self._source = "extra"

    def record_failure(self, name: str, source: str, exc: BaseException, version: str | None = None, *,
                       when: str = "at import", where: bool = True) -> None:
        """Record (and log) that plugin ``name`` could not be loaded."""
        error = describe_error(exc, when, where=where)
        self.records[name] = PluginRecord(name, source, version, error)
        log.warning("plugin %r failed to load: %s", name, error)
        log.debug("plugin %r failed to load", name, exc_info=exc)

    def describe(self) -> list[dict[str, Any]]:
        """The installed plugins as JSON-ready dicts: name, source, version, hooks, error."""
        rows = []
        for name, record in self.records.items():
            plugin = self.get_plugin(name)
            hooks = sorted(h.name for h in self.get_hookcallers(plugin) or []) if plugin is not None else []
            rows.append(
                {
                    "name": name,
                    "source": record.source,
                    "version": record.version,
                    "hooks": hooks,
                    "error": record.error,
                }
            )
        return rows

    # -- guards -------------------------------------------------------------------------------

    def _guard(self, impl: pluggy.HookImpl, hook: str, source: str) -> None:
        """Wrap ``impl.function`` (pluggy read its argument names already, at registration)."""
        if impl.hookwrapper or impl.wrapper:
            return  # generators driven by pluggy: left as they are
        name = impl.plugin_name
        if hook in STARTUP_HOOKS:  # SystemExit too: one plugin must not stop the app
            impl.function = _guarded(impl.function, functools.partial(self._hook_failed, name, hook))  # type: ignore[misc]
        elif source in GUARDED_SOURCES:  # SystemExit too: it must not end the server's worker thread
            impl.function = _guarded(impl.function, functools.partial(_request_failed, name, hook))  # type: ignore[misc]

    def _hook_failed(self, name: str, hook: str, exc: BaseException) -> None:
        """Record a start-up hook's failure on the plugin's record (logged once per message)."""
        error = describe_error(exc, f"in {hook}")
        record = self.records.get(name)
        if record is None:  # registered with plain ``register``
            record = self.records[name] = PluginRecord(name, self._source, None, None, self.get_plugin(name))
        if record.error is not None and error in record.error:
            return  # e.g. register_models failing again on each refresh
        record.error = error if record.error is None else f"{record.error}; {error}"
        log.warning("plugin %r failed in %s and was skipped: %s", name, hook, error)
        log.debug("plugin %r failed in %s", name, hook, exc_info=exc)


def _guarded(function: Callable[..., Any], failed: Callable[[BaseException], Any]) -> Callable[..., Any]:
    """``function`` with any exception but KeyboardInterrupt handed to ``failed`` (which returns the
    hook's answer or raises)."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return failed(exc)

    return guarded


def _request_failed(name: str, hook: str, exc: BaseException) -> None:
    """A request hook's failure: signals meant for the engine go on as they are, anything else
    becomes a :class:`PluginError` naming the plugin and the hook."""
    if _meant_for_the_engine(exc):
        raise exc
    error = PluginError(f"plugin {name!r} failed in {hook}: {describe_error(exc, where=False)}")
    log.warning("%s", error)
    log.debug("plugin %r failed in %s", name, hook, exc_info=exc)
    raise error from exc


def _meant_for_the_engine(exc: BaseException) -> bool:
    """Errors a request hook may raise on purpose: a message for the user, running out of memory
    (the engine retries with less), an interrupt or skip signal."""
    if isinstance(exc, LatentStudioError):
        return True
    # request hooks run inside an engine, so these modules (and torch) are loaded already
    from webui.engine.context import GenerationStopped
    from webui.engine.memory import is_out_of_memory

    return isinstance(exc, GenerationStopped) or is_out_of_memory(exc)


def api_mismatch(plugin: Any) -> str | None:
    """Why ``plugin`` cannot run on this program's :data:`API_VERSION`, or None when it can.

    A plugin declares the versions it supports in its :data:`API_ATTRIBUTE` attribute: a whole
    number (``LATENT_STUDIO_API = 1``) or a collection of them (``(1, 2)``, ``range(1, 3)``). A plugin
    that declares nothing runs (plugins written before versions were checked).
    """
    try:
        declared = getattr(plugin, API_ATTRIBUTE, None)
    except Exception:  # a hostile attribute: pluggy's registration reports the object
        return None
    if declared is None:
        return None
    versions = _api_versions(declared)
    if versions is None:
        try:
            shown = " ".join(repr(declared).split())[:80]
        except Exception:
            shown = f"a {type(declared).__name__}"
        return (f"declares {API_ATTRIBUTE} = {shown}, which is neither a whole number nor a collection of "
                f"them; this Latent Studio provides API {API_VERSION}")
    if API_VERSION in versions:
        return None
    if isinstance(versions, range):
        needs = f"{versions.start} to {versions.stop - 1}" if len(versions) > 1 else str(versions.start)
    else:
        needs = " or ".join(str(v) for v in sorted(versions))
    return f"needs plugin API {needs}; this Latent Studio provides API {API_VERSION}"


def _api_versions(declared: Any) -> range | set[int] | None:
    """The versions in a declaration, or None when it is not a number or a collection of numbers."""
    if isinstance(declared, range):
        return declared if len(declared) and declared.step == 1 else None
    items = [declared] if isinstance(declared, int) else declared
    if not isinstance(items, (list, tuple, set, frozenset)) or not items:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return set(items)


def make_plugin_manager(
    *,
    builtins: bool = True,
    entry_points: bool = True,
    plugin_dirs: Iterable[str | Path] | None = None,
    extra: Iterable[Any] = (),
) -> PluginManager:
    """Build a fresh plugin manager.

    ``plugin_dirs`` defaults to the folders in ``$LATENT_STUDIO_PLUGIN_DIRS`` when that is set,
    else the repository's ``plugins/`` folder; pass ``[]`` for none.
    ``extra`` plugins (objects or modules) are registered last, so they run first and their
    firstresult answers win (handy in tests and embedding code).
    """
    pm = PluginManager()
    if builtins:
        version = _own_version()
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            pm.register_plugin(module, module_name, source="builtin", version=version)
    if entry_points:
        _load_entry_points(pm)
    for directory in default_plugin_dirs() if plugin_dirs is None else plugin_dirs:
        _load_dropins(pm, Path(directory))
    for index, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
        pm.register_plugin(plugin, name, source="extra")
    return pm


def default_plugin_dirs() -> list[Path]:
    """The drop-in folders: ``$LATENT_STUDIO_PLUGIN_DIRS`` (``os.pathsep``-separated) when set,
    else ``plugins/`` next to ``launch.py``."""
    listed = os.environ.get(PLUGIN_DIRS_ENV)
    if listed is None:
        return [DEFAULT_PLUGIN_DIR]
    return [Path(part).expanduser() for part in listed.split(os.pathsep) if part.strip()]


def _load_entry_points(pm: PluginManager) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        version = dist.version if dist is not None else None
        name = ep.name
        if dist is not None and dist.metadata["Name"]:
            name = f"{dist.metadata['Name']}:{ep.name}"
        if name in pm.records:
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end the program
            pm.record_failure(name, "entrypoint", exc, version)
            continue
        pm.register_plugin(plugin, name, source="entrypoint", version=version)


def _load_dropins(pm: PluginManager, directory: Path) -> None:
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"plugins/{path.name}"
        module_name = f"latent_studio_dropin_{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except KeyboardInterrupt:
            sys.modules.pop(module_name, None)
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end the program
            sys.modules.pop(module_name, None)
            pm.record_failure(name, "dropin", exc)
            continue
        pm.register_plugin(module, name, source="dropin", version=getattr(module, "__version__", None))


def describe_error(exc: BaseException, when: str | None = None, *, where: bool = True) -> str:
    """``Type: message (when, file.py:line)`` on one line: the message's whitespace collapsed, cut
    to :data:`MAX_MESSAGE` characters; the file is the innermost real file's name (no folders)."""
    message = " ".join(str(exc).split())
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    notes = [when] if when else []
    frames = traceback.extract_tb(exc.__traceback__) if where and exc.__traceback__ else []
    last = [frame for frame in frames if not frame.filename.startswith("<")][-1:]  # not "<frozen ...>"
    if last:
        notes.append(f"{Path(last[0].filename).name}:{last[0].lineno}")
    return f"{text} ({', '.join(notes)})" if notes else text


def _own_version() -> str:
    from webui import __version__

    return __version__
