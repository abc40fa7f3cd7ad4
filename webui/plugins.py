"""Building a plugin manager: built-ins, pip-installed plugins, drop-in modules.

There is no global plugin manager: :func:`make_plugin_manager` builds a fresh one each time (each
engine, each test). Community plugins are found two ways:

* **installed packages** that declare an entry point in the ``latent_studio`` group::

      [project.entry-points.latent_studio]
      my_plugin = "my_package.plugin"

* **drop-in modules**: ``*.py`` files in the data folder's ``plugins/`` (next to ``launch.py`` in a
  checkout, see :mod:`webui.paths`; or any folder passed in ``plugin_dirs``, or listed in the
  ``LATENT_STUDIO_PLUGIN_DIRS`` environment variable, separated like ``PATH``, which then replaces
  ``plugins/``).

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

Which installed and drop-in plugins load is the user's choice, made without importing any of them:

* plugins turned off with ``launch.py plugins disable NAME`` (kept in the user's settings file, see
  :mod:`webui.plugin_settings`) are listed as ``disabled`` and never imported;
* ``--safe-mode`` (``LATENT_STUDIO_SAFE_MODE=1``) loads the built-ins only, ignoring the settings;
* ``--plugins NAME,...`` (``LATENT_STUDIO_PLUGINS``) loads only the plugins named (and the
  built-ins), whatever the settings say.

Skipped plugins are still listed (``status``: ``disabled``, ``safe mode`` or ``not selected``), so
``launch.py plugins`` and the Plugins tab show everything that is installed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pluggy

from webui import hookspecs, paths
from webui.errors import LatentStudioError, PluginError
from webui.plugin_settings import PluginSettings, PluginSettingsError, normalize_name

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT
PLUGIN_DIRS_ENV = "LATENT_STUDIO_PLUGIN_DIRS"  # drop-in folders instead of plugins/ (os.pathsep-separated)
# hooks called while an engine or the web app starts (or a model list is refreshed): a failure
# there is recorded and skipped; every other hook runs during a request
STARTUP_HOOKS = frozenset(
    {
        "startup",
        "register_schedulers",
        "register_models",
        "register_upscalers",
        "register_fields",
        "register_tasks",
        "register_ui_tabs",
    }
)
GUARDED_SOURCES = frozenset({"entrypoint", "dropin"})  # whose request-hook errors become PluginError
MAX_MESSAGE = 300  # characters of a plugin's error message kept in a record or a PluginError
API_VERSION = 1  # the plugin API this program provides (re-exported as webui.api.API_VERSION)
API_ATTRIBUTE = "LATENT_STUDIO_API"  # a plugin's declaration of the API versions it supports
SAFE_MODE_ENV = "LATENT_STUDIO_SAFE_MODE"  # 1: built-ins only (what --safe-mode sets)
ONLY_ENV = "LATENT_STUDIO_PLUGINS"  # comma-separated plugin names: only these load (what --plugins sets)
MAX_SOURCE_BYTES = 2 * 1024 * 1024  # the most of a plugin module's source read for its API declaration

BUILTIN_PLUGINS: tuple[str, ...] = (
    "webui.builtin.fields",
    "webui.builtin.schedulers",
    "webui.builtin.loaders",
    "webui.builtin.single_file",
    "webui.builtin.vae",
    "webui.builtin.metadata",
    "webui.builtin.text",
    "webui.builtin.layout",  # before embeddings and lora: its provide_conditioning (trylast) runs last
    "webui.builtin.embeddings",  # before lora: its provide_conditioning (trylast) runs after lora's
    "webui.builtin.lora",
    "webui.builtin.cfg_rescale",
    "webui.builtin.token_merging",
    "webui.builtin.deep_cache",
    "webui.builtin.hires",
    "webui.builtin.init_image",
    "webui.builtin.masked_image",
    "webui.builtin.outpaint",  # its prepare_request (tryfirst) makes the mask masked_image then blurs
    "webui.builtin.styles",
    "webui.builtin.segmap",
    "webui.builtin.xyz_plot",
    "webui.builtin.upscalers",
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
    skipped: str | None = None  # why it was not imported: "disabled", "safe mode" or "not selected"
    distribution: str | None = None  # the pip package an entry-point plugin comes from
    path: Path | None = None  # the drop-in file, or the entry point's module file (read, never imported)
    attribute: str | None = None  # the object the entry point names in that module ("module:attribute")
    dist: Any = field(default=None, repr=False)  # its importlib.metadata.Distribution

    @property
    def status(self) -> str:
        """``loaded``, ``failed`` (see ``error``), or why it was skipped."""
        return self.skipped or ("failed" if self.error else "loaded")

    @property
    def keys(self) -> tuple[str, ...]:
        """The names the settings may turn it off by: its own, and its distribution's."""
        return (self.name,) + ((normalize_name(self.distribution),) if self.distribution else ())


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers plugins that failed, and guards their hooks (see the
    module's docstring)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._source = "extra"  # the source of the plugin being registered
        # how it was built (make_plugin_manager), so the plugins on disk can be looked at again
        self.safe_mode = False
        self.only: list[str] | None = None
        self.entry_points = True
        self.plugin_dirs: list[Path] = []
        self.settings = PluginSettings()  # as read when it was built

    def discover(self) -> list[Candidate]:
        """The installed and drop-in plugins on disk now, from where this manager looked (nothing
        is imported); the web app compares this with :attr:`records` to show new installs."""
        return discover(entry_points=self.entry_points, plugin_dirs=self.plugin_dirs)

    def current_settings(self) -> PluginSettings:
        """The settings file as it is now; the one read at start when it cannot be read any more."""
        try:
            return PluginSettings.load()
        except PluginSettingsError as error:
            log.debug("plugin settings unreadable: %s", error)
            return self.settings

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
            self.records[name] = PluginRecord(
                name, source, version, mismatch, plugin
            )  # imported, not registered
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

    def record_failure(
        self,
        name: str,
        source: str,
        exc: BaseException,
        version: str | None = None,
        *,
        when: str = "at import",
        where: bool = True,
    ) -> None:
        """Record (and log) that plugin ``name`` could not be loaded."""
        error = describe_error(exc, when, where=where)
        self.records[name] = PluginRecord(name, source, version, error)
        log.warning("plugin %r failed to load: %s", name, error)
        log.debug("plugin %r failed to load", name, exc_info=exc)

    def describe(self) -> list[dict[str, Any]]:
        """The plugins as JSON-ready dicts (what ``launch.py plugins list`` prints): name, source
        (``builtin``, ``entrypoint``, ``dropin`` or ``extra``), version, hooks, error; ``enabled``
        (by the settings file as it is now: a change shows before the restart that applies it),
        ``status`` (``loaded``, ``failed``, ``disabled``, ``safe mode``, ``not selected``), the
        ``distribution`` of a pip plugin, the ``api_versions`` it declares (None: undeclared), and
        ``sha256`` of what was installed, with what was ``hashed`` (see :func:`installed_hash`)."""
        rows = []
        settings = None
        for name, record in self.records.items():
            plugin = self.get_plugin(name)
            hooks = sorted(h.name for h in self.get_hookcallers(plugin) or []) if plugin is not None else []
            enabled = True
            if record.source in GUARDED_SOURCES:
                settings = settings or self.current_settings()
                enabled = not settings.is_disabled(*record.keys)
            sha256, hashed = installed_hash(record)
            rows.append(
                {
                    "name": name,
                    "source": record.source,
                    "version": record.version,
                    "hooks": hooks,
                    "error": record.error,
                    "enabled": enabled,
                    "status": record.status,
                    "distribution": record.distribution,
                    "api_versions": _api_list(record),
                    "sha256": sha256,
                    "hashed": hashed,
                }
            )
        return rows

    # -- guards -------------------------------------------------------------------------------

    def call_wrappers(self, hook: str, **kwargs: Any) -> list[Callable[..., Any]]:
        """Call a ``wrap_*`` hook and return the wrapping functions in pluggy's call order, each
        guarded like the plugin's hooks: a function an installed or drop-in plugin returned (and
        every function that returns in turn) fails with a :class:`PluginError` naming the plugin
        and the hook instead of whatever it raised."""
        caller = getattr(self.hook, hook)
        impls = list(reversed(caller.get_hookimpls()))  # pluggy's call order
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            return list(caller(**kwargs))  # plain call: wrappers of the hook itself need pluggy
        results = []
        for impl in impls:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
            if result is None:
                continue
            record = self.records.get(impl.plugin_name)
            if callable(result) and record is not None and record.source in GUARDED_SOURCES:
                result = _guard_returned(result, impl.plugin_name, hook)
            results.append(result)
        return results

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


def _guard_returned(function: Callable[..., Any], name: str, hook: str) -> Callable[..., Any]:
    """``function`` (returned by plugin ``name``'s ``hook``) with its failures turned into
    :class:`PluginError` naming the plugin, and the callables it returns guarded the same way (a
    ``wrap_*`` hook returns a wrapper, which returns the wrapped call)."""

    def failed(exc: BaseException) -> None:
        _request_failed(name, f"the function its {hook} returned", exc)

    guarded = _guarded(function, failed)

    @functools.wraps(function)
    def guarding(*args: Any, **kwargs: Any) -> Any:
        result = guarded(*args, **kwargs)
        return (
            _guard_returned(result, name, hook)
            if callable(result) and not isinstance(result, type)
            else result
        )

    return guarding


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
        return (
            f"declares {API_ATTRIBUTE} = {shown}, which is neither a whole number nor a collection of "
            f"them; this Latent Studio provides API {API_VERSION}"
        )
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
    safe_mode: bool | None = None,
    only: Iterable[str] | None = None,
    settings: PluginSettings | None = None,
) -> PluginManager:
    """Build a fresh plugin manager.

    ``plugin_dirs`` defaults to the folders in ``$LATENT_STUDIO_PLUGIN_DIRS`` when that is set,
    else ``plugins/`` in the data folder (see :func:`default_plugin_dirs`); pass ``[]`` for none.
    ``extra`` plugins (objects or modules) are registered last, so they run first and their
    firstresult answers win (handy in tests and embedding code).
    ``safe_mode`` (built-ins and ``extra`` only) and ``only`` (names of the installed or drop-in
    plugins to load, see :func:`match_candidates`) default to ``$LATENT_STUDIO_SAFE_MODE`` and
    ``$LATENT_STUDIO_PLUGINS``, which ``--safe-mode`` and ``--plugins`` set. Otherwise plugins
    turned off in ``settings`` (default: the user's settings file, read only when a plugin is
    found that it could turn off) are not imported. An unreadable settings file raises
    :class:`~webui.plugin_settings.PluginSettingsError` (safe mode never reads it).
    """
    safe_mode = env_safe_mode() if safe_mode is None else safe_mode
    only = env_only() if only is None else [str(name) for name in only]
    pm = PluginManager()
    pm.safe_mode, pm.only, pm.entry_points = safe_mode, only, entry_points
    pm.plugin_dirs = [Path(d) for d in (default_plugin_dirs() if plugin_dirs is None else plugin_dirs)]
    if builtins:
        version = _own_version()
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            pm.register_plugin(module, module_name, source="builtin", version=version)
    candidates = discover(entry_points=entry_points, plugin_dirs=pm.plugin_dirs)
    selected: set[str] | None = None
    if only is not None and not safe_mode:
        selected = set()
        for wanted in only:
            matches = match_candidates(wanted, candidates)
            if not matches and wanted not in pm.records:
                log.warning("no installed or drop-in plugin is called %r (asked for by --plugins)", wanted)
            selected.update(candidate.name for candidate in matches)
    if candidates and not safe_mode and only is None:
        pm.settings = settings if settings is not None else PluginSettings.load()
    for candidate in candidates:
        if candidate.name in pm.records:
            continue
        if safe_mode:
            skipped: str | None = "safe mode"
        elif selected is not None:
            skipped = None if candidate.name in selected else "not selected"
        else:
            skipped = "disabled" if pm.settings.is_disabled(*candidate.keys) else None
        if skipped:
            pm.records[candidate.name] = candidate.record(skipped=skipped)
        elif candidate.source == "entrypoint":
            _load_entry_point(pm, candidate)
        else:
            _load_dropin(pm, candidate)
    for index, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
        pm.register_plugin(plugin, name, source="extra")
    return pm


def default_plugin_dirs() -> list[Path]:
    """The drop-in folders: ``$LATENT_STUDIO_PLUGIN_DIRS`` (``os.pathsep``-separated) when set,
    else ``plugins/`` in the data folder (:func:`webui.paths.plugins_dir`: next to ``launch.py`` in a
    checkout)."""
    listed = os.environ.get(PLUGIN_DIRS_ENV)
    if listed is None:
        return [paths.plugins_dir()]
    return [Path(part).expanduser() for part in listed.split(os.pathsep) if part.strip()]


# -- finding plugins without importing them -------------------------------------------------------


class PluginSelectionError(LatentStudioError):
    """``--plugins``, ``--safe-mode`` or their environment variables are malformed or contradictory."""


@dataclass(frozen=True)
class Candidate:
    """An installed (entry point) or drop-in plugin found on disk, not imported."""

    name: str  # "distribution:entry-point" or "plugins/file.py"
    source: str  # "entrypoint" or "dropin"
    version: str | None = None
    distribution: str | None = None
    path: Path | None = None  # the drop-in file or the entry point's module file
    attribute: str | None = None
    entry_point: Any = field(default=None, repr=False, compare=False)
    dist: Any = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.name,) + ((normalize_name(self.distribution),) if self.distribution else ())

    def record(self, **fields: Any) -> PluginRecord:
        return PluginRecord(
            self.name,
            self.source,
            self.version,
            distribution=self.distribution,
            path=self.path,
            attribute=self.attribute,
            dist=self.dist,
            **fields,
        )


def discover(
    *, entry_points: bool = True, plugin_dirs: Iterable[str | Path] | None = None
) -> list[Candidate]:
    """Every installed plugin (the ``latent_studio`` entry points) and drop-in file, in loading order,
    found without importing any: the first of a name wins."""
    found: dict[str, Candidate] = {}
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            version = dist.version if dist is not None else None
            distribution = (dist.metadata["Name"] or None) if dist is not None else None
            name = f"{distribution}:{ep.name}" if distribution else ep.name
            if name not in found:
                found[name] = Candidate(
                    name,
                    "entrypoint",
                    version,
                    distribution,
                    _module_file(ep, dist),
                    getattr(ep, "attr", None),
                    ep,
                    dist,
                )
    for directory in default_plugin_dirs() if plugin_dirs is None else plugin_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.py")):
            name = f"plugins/{path.name}"
            if not path.name.startswith("_") and name not in found:
                found[name] = Candidate(name, "dropin", _static_version(path), None, path)
    return list(found.values())


def match_candidates(name: str, candidates: Iterable[Candidate]) -> list[Candidate]:
    """The plugins a user's ``name`` means, the first kind that matches: a plugin's full name
    (``dist:entry``, ``plugins/x.py``), a distribution (all its entry points; compared the way pip
    compares names), a drop-in file (``x.py`` or ``x``), an entry point's own name. Empty when
    nothing matches."""
    candidates = list(candidates)
    text = name.strip()
    exact = [c for c in candidates if c.name == text]
    if exact:
        return exact
    wanted = normalize_name(text)
    by_dist = [c for c in candidates if c.distribution and normalize_name(c.distribution) == wanted]
    if by_dist:
        return by_dist
    dist, sep, entry = text.partition(":")
    if sep:
        return [
            c
            for c in candidates
            if c.distribution
            and normalize_name(c.distribution) == normalize_name(dist)
            and c.name.partition(":")[2] == entry.strip()
        ]
    file = text.removeprefix("plugins/")
    file = file if file.endswith(".py") else f"{file}.py"
    dropins = [c for c in candidates if c.source == "dropin" and c.path is not None and c.path.name == file]
    if dropins:
        return dropins
    return [c for c in candidates if c.source == "entrypoint" and c.name.partition(":")[2] == text]


def env_safe_mode() -> bool:
    """``$LATENT_STUDIO_SAFE_MODE`` as a switch (unset or empty: off)."""
    raw = os.environ.get(SAFE_MODE_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise PluginSelectionError(f"{SAFE_MODE_ENV} must be 1 (on) or 0 (off), not {raw[:40]!r}")


def env_only() -> list[str] | None:
    """The plugin names in ``$LATENT_STUDIO_PLUGINS`` (comma-separated), or None when it is unset."""
    raw = os.environ.get(ONLY_ENV)
    if raw is None or not raw.strip():
        return None
    return split_names(raw)


def split_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _module_file(ep: Any, dist: Any) -> Path | None:
    """The file of the module an entry point names, from its distribution's file list (so nothing,
    not even the package's ``__init__``, is imported); None when it cannot be told."""
    module = str(getattr(ep, "value", "")).partition(":")[0].strip()
    if not module or dist is None:
        return None
    stem = module.replace(".", "/")
    try:
        files = dist.files or []
        for file in files:
            if str(file).replace("\\", "/") in (f"{stem}.py", f"{stem}/__init__.py"):
                return Path(dist.locate_file(file))
    except Exception as error:  # a malformed RECORD: only the listing loses the file
        log.debug("cannot read the file list of %s: %s", module, error)
    return None


def _load_entry_point(pm: PluginManager, candidate: Candidate) -> None:
    try:
        plugin = candidate.entry_point.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a plugin must not end the program
        pm.record_failure(candidate.name, "entrypoint", exc, candidate.version)
    else:
        pm.register_plugin(plugin, candidate.name, source="entrypoint", version=candidate.version)
    _add_origin(pm.records.get(candidate.name), candidate)


def _load_dropin(pm: PluginManager, candidate: Candidate) -> None:
    path = candidate.path
    assert path is not None
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
        pm.record_failure(candidate.name, "dropin", exc)
    else:
        pm.register_plugin(
            module, candidate.name, source="dropin", version=getattr(module, "__version__", None)
        )
    _add_origin(pm.records.get(candidate.name), candidate)


def _add_origin(record: PluginRecord | None, candidate: Candidate) -> None:
    if record is not None:
        record.distribution, record.path = candidate.distribution, candidate.path
        record.attribute, record.dist = candidate.attribute, candidate.dist


# -- what a plugin declares, read from its source without running it -------------------------------


def declared_api(source: str | bytes, attribute: str | None = None) -> Any:
    """What a plugin module's ``source`` declares as ``LATENT_STUDIO_API``, read without running it.

    The value of the module's top-level assignment (with ``attribute``: of the class of that name
    in the module): a whole number, a tuple, list or set of them, or ``range(a, b)``, all literal;
    None when there is no assignment. Raises :class:`ValueError` when the declaration is there but
    not literal, or the source cannot be parsed: only importing the module could tell then.
    """
    if len(source) > MAX_SOURCE_BYTES:
        raise ValueError(f"the module's source is over {MAX_SOURCE_BYTES // 1024} KB")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"the module's source cannot be parsed ({type(error).__name__})") from None
    container: ast.AST = tree
    if attribute is not None:
        classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == attribute]
        if not classes:
            raise ValueError(f"{attribute!r} is not a class defined in the module")
        container = classes[-1]
    value = _assigned(container, API_ATTRIBUTE)
    if value is None:
        return None
    try:
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "range"
            and not value.keywords
            and 1 <= len(value.args) <= 3
        ):
            bounds = [ast.literal_eval(arg) for arg in value.args]
            if all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                return range(*bounds)
            raise ValueError("range() of something other than whole numbers")
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"{API_ATTRIBUTE} is not a literal") from None


def _assigned(container: Any, name: str) -> ast.expr | None:
    """The expression last assigned to ``name`` directly in ``container``'s body; ValueError when it
    is only assigned somewhere deeper (under an ``if`` or ``try``), None when nowhere."""

    def targets(node: ast.AST) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return node.targets
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            return [node.target]
        return []

    def assigns(node: ast.AST) -> bool:
        return any(isinstance(t, ast.Name) and t.id == name for t in targets(node))

    def nested(node: ast.AST) -> bool:
        """Assigned inside a compound statement (if, try, with, for, while), not a class or function."""
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return False
        return assigns(node) or any(nested(child) for child in ast.iter_child_nodes(node))

    top = [node for node in container.body if assigns(node)]
    if not top:
        if any(nested(node) for node in container.body):
            raise ValueError(f"{name} is assigned conditionally")
        return None
    last = top[-1]
    if isinstance(last, ast.AugAssign) or getattr(last, "value", None) is None:
        raise ValueError(f"{name} is not assigned a value")
    return last.value  # type: ignore[no-any-return]


def api_mismatch_of(declared: Any) -> str | None:
    """:func:`api_mismatch` for a declaration read from source (see :func:`declared_api`)."""
    return api_mismatch(SimpleNamespace(**{API_ATTRIBUTE: declared}))


def _read_source(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_SOURCE_BYTES + 1)
    except OSError:
        return None


def _static_version(path: Path) -> str | None:
    """A drop-in file's literal ``__version__``, read without running it."""
    source = _read_source(path)
    if source is None or len(source) > MAX_SOURCE_BYTES:
        return None
    try:
        value = _assigned(ast.parse(source), "__version__")
        version = ast.literal_eval(value) if value is not None else None
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return version if isinstance(version, str) and len(version) <= 64 else None


def _api_list(record: PluginRecord) -> list[int] | None:
    """The API versions a plugin declares (at most 32 of them), as a sorted list; None when it declares
    none, or none that can be read."""
    try:
        if record.module is not None or record.source in ("builtin", "extra"):
            declared = getattr(record.module, API_ATTRIBUTE, None)
        elif record.path is not None:
            source = _read_source(record.path)
            declared = declared_api(source, record.attribute) if source is not None else None
        else:
            return None
    except Exception:  # a hostile attribute, or a declaration only importing can read
        return None
    versions = _api_versions(declared) if declared is not None else None
    if versions is None:
        return None
    return list(versions[:32]) if isinstance(versions, range) else sorted(versions)[:32]


def installed_hash(record: PluginRecord) -> tuple[str | None, str | None]:
    """The SHA-256 of what was installed, and what was hashed: ``file`` (a drop-in's file),
    ``wheel`` (the wheel pip installed, recorded by pip in the package's ``direct_url.json``, as
    ``launch.py plugins install`` does), or ``RECORD`` (a package installed another way: its
    RECORD file, which lists every installed file with its own hash). (None, None) for built-ins."""
    if record.source == "dropin" and record.path is not None:
        try:
            return hashlib.sha256(record.path.read_bytes()).hexdigest(), "file"
        except OSError:
            return None, None
    dist = record.dist
    if record.source != "entrypoint" or dist is None:
        return None, None
    try:
        direct = dist.read_text("direct_url.json")
        if direct:
            archive = json.loads(direct).get("archive_info") or {}
            digest = (archive.get("hashes") or {}).get("sha256") or ""
            if not digest and str(archive.get("hash", "")).startswith("sha256="):
                digest = str(archive["hash"])[len("sha256=") :]
            if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return digest, "wheel"
        for file in dist.files or []:  # RECORD lists itself: hash its bytes as they are on disk
            if file.name == "RECORD" and str(file.parent).endswith(".dist-info"):
                return hashlib.sha256(Path(str(dist.locate_file(file))).read_bytes()).hexdigest(), "RECORD"
    except Exception as error:  # malformed metadata: listed without a hash
        log.debug("cannot hash %s: %s", record.name, error)
    return None, None


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
