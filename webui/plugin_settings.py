"""Which plugins are turned off: a small JSON file in the user's data folder, never in the code tree.

The folder is decided in :mod:`webui.paths` (:func:`~webui.paths.settings_dir`): the data folder
given with ``--data-dir``, else ``$LATENT_STUDIO_HOME``, else ``$XDG_DATA_HOME/latent-studio``, else
``~/.local/share/latent-studio``. The file, ``plugins.json``, holds one list::

    {"disabled": ["latent-studio-example-plugin", "plugins/karras_euler_a.py"]}

Each entry is a distribution name (every entry point of that package is off), a plugin's full name
(``distribution:entry-point``) or a drop-in file (``plugins/name.py``). Everything else is on.

The file is read as hostile input: one that is too big, not UTF-8, not JSON or of the wrong shape
is refused with a one-line :class:`PluginSettingsError` naming the file and saying how to fix it,
instead of being half-read or silently replaced. It is written atomically (a temporary file, then a
rename), so an interrupted write leaves the old file whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from webui import paths
from webui.atomic import write_text_atomic
from webui.errors import LatentStudioError

__all__ = [
    "HOME_ENV",
    "MAX_BYTES",
    "PluginSettings",
    "PluginSettingsError",
    "data_dir",
    "normalize_name",
    "settings_path",
]

HOME_ENV = paths.HOME_ENV  # the user data folder (settings, kept plugin wheels); tests point it elsewhere
SETTINGS_FILE = "plugins.json"
MAX_BYTES = 256 * 1024  # far more than any real list of plugin names
MAX_ENTRIES = 1000
MAX_NAME = 200  # characters in one entry


class PluginSettingsError(LatentStudioError):
    """The plugin settings file cannot be read or written; the message names it and says what to do."""


def data_dir() -> Path:
    """The folder of the plugin settings and the kept plugin wheels (not created here)."""
    return paths.settings_dir()


def settings_path() -> Path:
    return data_dir() / SETTINGS_FILE


_SEPARATORS = re.compile(r"[-_.]+")


def normalize_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return _SEPARATORS.sub("-", name.strip()).lower()


@dataclass
class PluginSettings:
    """The settings file's contents: the plugins turned off."""

    disabled: list[str] = field(default_factory=list)
    path: Path | None = None  # where it was read from (None: nothing on disk yet)

    def is_disabled(self, *keys: str | None) -> bool:
        """Whether any of ``keys`` (a plugin's full name, its distribution's name...) is turned off."""
        off = set(self.disabled)
        return any(key is not None and key in off for key in keys)

    @classmethod
    def load(cls, path: Path | None = None) -> PluginSettings:
        """Read the settings at ``path`` (default :func:`settings_path`); a missing file means
        every plugin is on. Raises :class:`PluginSettingsError` for anything else unusable."""
        path = settings_path() if path is None else path
        fix = f"fix it or delete it (then every plugin is on): {path}"
        try:
            if not path.exists():
                return cls(path=path)
            if not path.is_file():
                raise PluginSettingsError(f"the plugin settings {path} is not a file; remove it")
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise PluginSettingsError(
                    f"the plugin settings file is {size} bytes, more than the {MAX_BYTES} it may have; {fix}"
                )
            with path.open("rb") as handle:
                raw = handle.read(MAX_BYTES + 1)  # the file may grow between stat and read
        except OSError as error:
            raise PluginSettingsError(
                f"cannot read the plugin settings {path}: {error.strerror or type(error).__name__}"
            ) from None
        if len(raw) > MAX_BYTES:
            raise PluginSettingsError(f"the plugin settings file is more than {MAX_BYTES} bytes; {fix}")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PluginSettingsError(f"the plugin settings file is not UTF-8 text; {fix}") from None
        if not text.strip():
            return cls(path=path)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            where = (
                f" (line {error.lineno}, column {error.colno})"
                if isinstance(error, json.JSONDecodeError)
                else ""
            )
            raise PluginSettingsError(f"the plugin settings file is not valid JSON{where}; {fix}") from None
        return cls(disabled=_disabled_list(data, fix), path=path)

    def save(self, path: Path | None = None) -> Path:
        """Write the settings (atomically); returns the file's path."""
        path = path or self.path or settings_path()
        body = json.dumps({"disabled": sorted(set(self.disabled))}, indent=2) + "\n"
        try:
            write_text_atomic(path, body)
        except OSError as error:
            raise PluginSettingsError(
                f"cannot write the plugin settings {path}: {error.strerror or type(error).__name__}"
            ) from None
        self.path = path
        return path


def _disabled_list(data: object, fix: str) -> list[str]:
    """The ``disabled`` entries of the parsed file, checked."""
    if not isinstance(data, dict):
        raise PluginSettingsError(
            f"the plugin settings file must hold a JSON object like "
            f'{{"disabled": ["name"]}}, not a {type(data).__name__}; {fix}'
        )
    disabled = data.get("disabled", [])
    if not isinstance(disabled, list):
        raise PluginSettingsError(
            f'"disabled" in the plugin settings file must be a list of plugin names, '
            f"not a {type(disabled).__name__}; {fix}"
        )
    if len(disabled) > MAX_ENTRIES:
        raise PluginSettingsError(
            f'"disabled" in the plugin settings file has {len(disabled)} entries, more than '
            f"the {MAX_ENTRIES} it may have; {fix}"
        )
    names: list[str] = []
    for index, entry in enumerate(disabled):
        if not isinstance(entry, str) or not entry.strip():
            raise PluginSettingsError(
                f'entry {index} of "disabled" in the plugin settings file is not a plugin name; {fix}'
            )
        if len(entry) > MAX_NAME or any(ord(c) < 32 for c in entry):
            raise PluginSettingsError(
                f'entry {index} of "disabled" in the plugin settings file is not a plugin '
                f"name (too long or with control characters); {fix}"
            )
        names.append(entry.strip())
    return names
