"""Building a plugin manager: built-ins, pip-installed plugins, drop-in modules.

There is no global plugin manager: :func:`make_plugin_manager` builds a fresh one each time (each
engine, each test). Community plugins are found two ways:

* **installed packages** that declare an entry point in the ``latent_studio`` group::

      [project.entry-points.latent_studio]
      my_plugin = "my_package.plugin"

* **drop-in modules**: ``*.py`` files in the ``plugins/`` folder next to ``launch.py`` (or any
  folder passed in ``plugin_dirs``).

Each is loaded on its own inside try/except: a broken plugin is recorded (name and error) and
listed by ``launch.py plugins``, and every other plugin still loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from webui import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLUGIN_DIR = REPO_ROOT / "plugins"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "webui.builtin.schedulers",
    "webui.builtin.loaders",
    "webui.builtin.single_file",
    "webui.builtin.vae",
    "webui.builtin.metadata",
    "webui.builtin.text",
    "webui.builtin.init_image",
    "webui.builtin.masked_image",
    "webui.builtin.segmap",
    "webui.builtin.ui_tabs",
)


@dataclass
class PluginRecord:
    """What is known about one plugin: where it came from and whether it loaded."""

    name: str
    source: str  # "builtin", "entrypoint" or "dropin"
    version: str | None = None
    error: str | None = None
    module: ModuleType | None = field(default=None, repr=False)


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers plugins that failed to load."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}

    def register_plugin(self, plugin: Any, name: str, *, source: str, version: str | None = None) -> None:
        """Register ``plugin`` under ``name``; a failure is recorded instead of raised."""
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # a plugin with a malformed hook
            self.records[name] = PluginRecord(name, source, version, _describe(exc))
        else:
            self.records[name] = PluginRecord(name, source, version, None, plugin)

    def record_failure(self, name: str, source: str, exc: BaseException, version: str | None = None) -> None:
        self.records[name] = PluginRecord(name, source, version, _describe(exc))

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


def make_plugin_manager(
    *,
    builtins: bool = True,
    entry_points: bool = True,
    plugin_dirs: Iterable[str | Path] | None = None,
    extra: Iterable[Any] = (),
) -> PluginManager:
    """Build a fresh plugin manager.

    ``plugin_dirs`` defaults to the repository's ``plugins/`` folder; pass ``[]`` for none.
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
    for directory in [DEFAULT_PLUGIN_DIR] if plugin_dirs is None else plugin_dirs:
        _load_dropins(pm, Path(directory))
    for index, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
        pm.register_plugin(plugin, name, source="extra")
    return pm


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
        except Exception as exc:
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
        except Exception as exc:
            sys.modules.pop(module_name, None)
            pm.record_failure(name, "dropin", exc)
            continue
        pm.register_plugin(module, name, source="dropin", version=getattr(module, "__version__", None))


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _own_version() -> str:
    from webui import __version__

    return __version__
