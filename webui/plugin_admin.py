"""Managing plugins: ``launch.py plugins list|install|uninstall|enable|disable|new`` and the web
app's Plugins tab (both call the functions here).

Installing (:func:`prepare`, then :func:`install_prepared`) never runs any of the package's code
before it is installed, and never leaves a half-installed environment:

1. SPEC becomes one wheel file in a temporary folder. A ``.whl`` is copied; a project folder or a
   source archive is built with ``pip wheel --no-deps`` (which runs the project's build script:
   the user pointed at those sources); anything else (a name, ``NAME==1.2``, a URL) is fetched with
   ``pip wheel --no-deps --only-binary=:all:``, so only ready-made wheels come in unless
   ``--allow-build`` is given. The web app installs wheels only.
2. The wheel's metadata is read from the zip, not imported: its name, version, dependencies and
   ``latent_studio`` entry points. A package with no such entry point is refused, and so is one
   whose plugin modules declare other plugin API versions: ``LATENT_STUDIO_API = 1`` (or a tuple,
   or ``range(a, b)``) at the top of the module the entry point names is read from the wheel's
   source with :mod:`ast` (see :func:`webui.plugins.declared_api`). A declaration that is not a
   literal cannot be read that way; the app still checks it when it loads the plugin.
3. ``pip install --dry-run --report`` says what pip would install with it (dependencies, and
   which installed versions they replace); that and the wheel's SHA-256 are shown, with the
   warning that a plugin runs with the app's rights, and the user confirms (``--yes`` skips it).
4. The installed distributions about to be replaced are backed up (their files, hard-linked or
   copied), ``pip check`` runs before and after ``pip install "NAME @ file:///...whl#sha256=..."``
   (pip verifies the hash and records it in the package's ``direct_url.json``, where the Plugins
   list reads it back), and when the install or ``pip check`` fails (a problem that was not there
   before), everything it installed is uninstalled and the backups are put back. The error is
   one line.

The wheel that was installed is kept in ``<data folder>/wheels/`` (see
:mod:`webui.plugin_settings`), so what ``pip freeze`` names still exists and can be hashed again.
"""

from __future__ import annotations

import argparse
import configparser
import email.parser
import filecmp
import hashlib
import importlib.util
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from webui.errors import LatentStudioError
from webui.plugin_settings import PluginSettings, data_dir, normalize_name
from webui.plugins import (
    API_ATTRIBUTE,
    API_VERSION,
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    ONLY_ENV,
    SAFE_MODE_ENV,
    Candidate,
    api_mismatch_of,
    declared_api,
    discover,
    match_candidates,
    split_names,
)

__all__ = [
    "TRUST",
    "PluginAdminError",
    "Prepared",
    "WheelInfo",
    "add_plugin_options",
    "add_plugins_parser",
    "inspect_wheel",
    "install_prepared",
    "new_plugin",
    "prepare",
    "run_command",
    "set_enabled",
    "uninstall",
]

TRUST = (
    "A plugin runs inside Latent Studio with the app's rights: it can read and change your files, use the "
    "network and start programs. Install only plugins you trust."
)
MAX_SPEC = 2000  # characters of an install spec
MAX_WHEEL_BYTES = 2 * 1024**3  # plugins may ship weights, but not more than this
MAX_MEMBER_BYTES = 1024 * 1024  # METADATA, entry_points.txt, WHEEL
MAX_MODULE_BYTES = 2 * 1024 * 1024  # a plugin module's source, read for its API declaration
PIP_TIMEOUT = 1800  # seconds one pip command may take (a big dependency over a slow network)
SOURCE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # a distribution name (PEP 508)
_NEW_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_install_lock = threading.Lock()  # one install or uninstall at a time in this process (web sessions)


class PluginAdminError(LatentStudioError):
    """A plugin could not be installed, removed, turned on or off, or created; one line saying why."""


# -- the command line -----------------------------------------------------------------------------


def add_plugins_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``plugins`` command and its actions, on the CLI's subparsers."""
    plugins = commands.add_parser(
        "plugins",
        help="list, install, uninstall, enable, disable or create plugins (default: list)",
        description="Manage Latent Studio plugins. " + TRUST,
    )
    actions = plugins.add_subparsers(dest="plugins_command", metavar="ACTION")
    actions.add_parser(
        "list",
        help="every plugin as JSON: source, version, API versions, hooks, status, "
        "error, enabled, SHA-256 of what was installed (the default action)",
    )
    install = actions.add_parser(
        "install",
        help="install a plugin package into this app's Python environment with pip",
        description="Install a plugin with pip into the Python that runs Latent Studio. The package is checked "
        "from its metadata before anything of it runs (a latent_studio entry point, the plugin API version), "
        "shown, and installed after you confirm; `pip check` runs after it, and a failure rolls everything "
        "back. " + TRUST,
    )
    install.add_argument(
        "spec",
        metavar="SPEC",
        help="a package name (NAME or NAME==1.2), a .whl file, a source "
        "archive, a project folder or a URL: anything pip installs",
    )
    install.add_argument("-y", "--yes", action="store_true", help="install without asking")
    install.add_argument(
        "--allow-build",
        action="store_true",
        help="let pip build packages from source (running their build scripts) when no wheel "
        "exists; without it, only ready-made wheels are downloaded",
    )
    install.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build a project folder or source archive with the build tools already installed "
        "(pip's --no-build-isolation; works offline)",
    )
    uninstall_parser = actions.add_parser("uninstall", help="uninstall a plugin package with pip")
    uninstall_parser.add_argument(
        "name", metavar="NAME", help="the package (or plugin) name, see `plugins list`"
    )
    uninstall_parser.add_argument("-y", "--yes", action="store_true", help="uninstall without asking")
    for action, text in (
        ("enable", "turn a plugin on again"),
        ("disable", "turn a plugin off: it is not even imported, from the next start"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument(
            "name",
            metavar="NAME",
            help="a package name (all its plugins), a plugin's full name or a drop-in file name",
        )
    new = actions.add_parser("new", help="write a ready plugin package to start from")
    new.add_argument("name", metavar="NAME", help="the package name, e.g. latent-studio-my-style")
    new.add_argument(
        "--dir", type=Path, default=Path("."), help="where to create the NAME folder (default: here)"
    )
    return plugins


def run_command(args: argparse.Namespace) -> int:
    """Run ``launch.py plugins ACTION``; errors raise :class:`~webui.errors.LatentStudioError`."""
    action = getattr(args, "plugins_command", None) or "list"
    if action == "list":
        from webui.plugins import make_plugin_manager

        print(json.dumps(make_plugin_manager().describe(), indent=2))
        return 0
    if action == "install":
        prepared = prepare(
            args.spec, allow_build=args.allow_build, build_isolation=not args.no_build_isolation, say=_say
        )
        with prepared:
            print(prepared.summary())
            if not args.yes and not _ask("Install it? [y/N] "):
                print("not installed")
                return 1
            print(install_prepared(prepared, say=_say))
        return 0
    if action == "uninstall":
        return 0 if uninstall(args.name, confirm=None if args.yes else _ask, say=_say) else 1
    if action in ("enable", "disable"):
        print(set_enabled(args.name, action == "enable"))
        return 0
    if action == "new":
        folder = new_plugin(args.name, args.dir)
        print(
            f"wrote {folder}: pyproject.toml, README.md, {_module_name(args.name)}/plugin.py, tests/test_plugin.py"
        )
        print(f"install it:  python launch.py plugins install {folder}")
        print(f"test it:     python -m pytest {folder / 'tests'}   (from the Latent Studio folder)")
        return 0
    raise PluginAdminError(f"unknown plugins action {action!r}")


def _say(line: str) -> None:
    print(line, flush=True)


def _ask(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        answer = ""
    if not sys.stdin.isatty():
        print()  # the answer came from a pipe: end the question's line
    return answer.strip().lower() in ("y", "yes")


def _refuse(message: str) -> None:
    """A bad ``--safe-mode``/``--plugins``: one line and exit status 2, as for every input error
    (argparse's own ``parser.error`` would print the whole usage first)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- --safe-mode and --plugins ------------------------------------------------------------------------


class _SafeModeAction(argparse.Action):
    """``--safe-mode``: also sets ``$LATENT_STUDIO_SAFE_MODE``, where the plugin manager reads it
    (every command builds its engine through :func:`webui.plugins.make_plugin_manager`), and
    which a restarted server and child processes inherit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, "plugins", None):
            _refuse("--safe-mode loads no installed plugin and --plugins names some: give one of them")
        setattr(namespace, self.dest, True)
        os.environ[SAFE_MODE_ENV] = "1"


class _OnlyAction(argparse.Action):
    """``--plugins NAME,...``: checked against the plugins on disk (nothing is imported), then set
    in ``$LATENT_STUDIO_PLUGINS`` like ``--safe-mode``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        names = split_names(str(values))
        if not names:
            _refuse("--plugins needs at least one plugin name (--safe-mode loads none)")
        if getattr(namespace, "safe_mode", False):
            _refuse("--safe-mode loads no installed plugin and --plugins names some: give one of them")
        candidates = discover()
        unknown = [
            name for name in names if name not in BUILTIN_PLUGINS and not match_candidates(name, candidates)
        ]
        if unknown:
            _refuse(
                f"--plugins: no installed or drop-in plugin is called {unknown[0][:100]!r} "
                f"(installed: {_listing(candidates)})"
            )
        setattr(namespace, self.dest, names)
        os.environ[ONLY_ENV] = ",".join(names)


def add_plugin_options(parser: argparse.ArgumentParser) -> None:
    """``--safe-mode`` and ``--plugins``, for every command (give them before the command)."""
    group = parser.add_argument_group("plugins (any command; give them before the command)")
    group.add_argument(
        "--safe-mode",
        action=_SafeModeAction,
        help="start with the built-in plugins only: no installed or drop-in plugin is imported",
    )
    group.add_argument(
        "--plugins",
        action=_OnlyAction,
        default=None,
        metavar="NAME[,NAME...]",
        help="load only these installed or drop-in plugins (and the built-ins), whether or not "
        "they are disabled",
    )


# -- turning plugins on and off ---------------------------------------------------------------------


def set_enabled(name: str, enabled: bool, *, plugin_dirs: list[Path] | None = None) -> str:
    """Turn the plugins ``name`` means on or off in the settings file; returns what was done.
    Nothing is imported: the change applies from the next start."""
    name = _check_name(name)
    if name in BUILTIN_PLUGINS or name.startswith("webui.builtin."):
        raise PluginAdminError(
            f"{name} is built in: it is part of Latent Studio and cannot be turned off "
            "(--safe-mode starts with the built-ins only)"
        )
    candidates = discover(plugin_dirs=plugin_dirs)
    matches = match_candidates(name, candidates)
    if not matches:
        raise PluginAdminError(
            f"no installed or drop-in plugin is called {name!r} (installed: {_listing(candidates)})"
        )
    settings = PluginSettings.load()
    dists = {normalize_name(c.distribution) for c in matches if c.distribution}
    whole_package = len(dists) == 1 and normalize_name(name) in dists or len(matches) > 1
    keys = sorted(dists) if whole_package else [matches[0].name]
    named = ", ".join(keys)
    if enabled:
        every = {key for candidate in matches for key in candidate.keys}
        removed = sorted({entry for entry in settings.disabled if entry in every})
        if not removed:
            return f"{named} is already enabled"
        settings.disabled = [entry for entry in settings.disabled if entry not in every]
        settings.save()
        return f"enabled {', '.join(removed)}: it loads from the next start (restart a running server to apply it)"
    if all(key in settings.disabled for key in keys):
        return f"{named} is already disabled"
    settings.disabled = sorted(set(settings.disabled) | set(keys))
    path = settings.save()
    return (
        f"disabled {named}: it is not loaded from the next start (restart a running server to apply it); "
        f"kept in {path}"
    )


def _listing(candidates: list[Candidate]) -> str:
    names = sorted({c.distribution or c.name for c in candidates})
    if not names:
        return "none"
    shown = ", ".join(names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _check_name(name: str) -> str:
    name = str(name).strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise PluginAdminError("a plugin name must be 1 to 200 printable characters")
    return name


# -- reading a wheel --------------------------------------------------------------------------------


@dataclass
class EntryPointInfo:
    """One ``latent_studio`` entry point of a wheel and the API versions its module declares."""

    name: str
    value: str
    api: Any = None  # the declaration read from source (None: declares nothing)
    readable: bool = True  # False: the declaration exists but only importing could read it

    def describe(self) -> str:
        if not self.readable:
            api = "plugin API: declared in code, checked when it loads"
        elif self.api is None:
            api = "plugin API: not declared"
        else:
            api = f"plugin API {_show_api(self.api)}"
        return f"{self.name} = {self.value} ({api})"


@dataclass
class WheelInfo:
    """What a wheel says about itself, read from the zip without running any of it."""

    path: Path
    name: str
    version: str
    summary: str
    sha256: str
    size: int
    entry_points: list[EntryPointInfo]
    requires: list[str] = field(default_factory=list)
    requires_python: str | None = None


def inspect_wheel(path: Path) -> WheelInfo:
    """Read and check the wheel at ``path``: a plugin package (at least one ``latent_studio`` entry
    point) for this app's plugin API. Raises :class:`PluginAdminError` naming the problem."""
    label = path.name
    try:
        size = path.stat().st_size
    except OSError as error:
        raise PluginAdminError(f"cannot read {label}: {error.strerror or type(error).__name__}") from None
    if size > MAX_WHEEL_BYTES:
        raise PluginAdminError(
            f"{label} is {size / 2**30:.1f} GB, more than the {MAX_WHEEL_BYTES / 2**30:.0f} GB "
            "a plugin may be"
        )
    if not label.endswith(".whl"):
        raise PluginAdminError(f"{label} is not a wheel (its name does not end in .whl)")
    try:
        with zipfile.ZipFile(path) as archive:
            info = _read_wheel(archive, label)
    except zipfile.BadZipFile:
        raise PluginAdminError(f"{label} is not a wheel: it is not a zip archive") from None
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.LargeZipFile) as error:
        raise PluginAdminError(
            f"{label} cannot be read as a wheel ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]})"
        ) from None
    info.path, info.size, info.sha256 = path, size, _sha256(path)
    return info


def _read_wheel(archive: zipfile.ZipFile, label: str) -> WheelInfo:
    names = archive.namelist()
    dist_infos = sorted({n.split("/", 1)[0] for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)})
    if len(dist_infos) != 1:
        raise PluginAdminError(
            f"{label} is not a wheel: it has {len(dist_infos)} .dist-info/METADATA files, not one"
        )
    dist_info = dist_infos[0]
    meta = email.parser.BytesParser().parsebytes(_member(archive, f"{dist_info}/METADATA", label))
    name = str(meta.get("Name") or "").strip()
    version = str(meta.get("Version") or "").strip()
    if not _NAME.match(name) or len(name) > 200:
        raise PluginAdminError(f"{label}: its METADATA has no valid Name")
    if not version or len(version) > 100 or any(c.isspace() for c in version):
        raise PluginAdminError(f"{label}: its METADATA has no valid Version")
    if normalize_name(label.split("-", 1)[0]) != normalize_name(name):
        raise PluginAdminError(f"{label}: the file name does not match the package inside it ({name})")
    summary = " ".join(str(meta.get("Summary") or "").split())[:300]
    requires = [" ".join(str(r).split())[:300] for r in (meta.get_all("Requires-Dist") or [])][:200]
    points = _entry_points(archive, f"{dist_info}/entry_points.txt", label, names)
    if not points:
        raise PluginAdminError(
            f"{name} {version} declares no {ENTRY_POINT_GROUP} entry point, so it is not a "
            "Latent Studio plugin: not installed"
        )
    for point in points:
        mismatch = api_mismatch_of(point.api) if point.readable and point.api is not None else None
        if mismatch:
            raise PluginAdminError(f"{name} {version}: its plugin {point.name!r} {mismatch}: not installed")
    python = str(meta.get("Requires-Python") or "").strip()[:100] or None
    return WheelInfo(Path(label), name, version, summary, "", 0, points, requires, python)


def _member(archive: zipfile.ZipFile, member: str, label: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise PluginAdminError(
            f"{label}: {member} is {info.file_size} bytes, more than the {limit} it may be"
        )
    with archive.open(info) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise PluginAdminError(f"{label}: {member} is more than {limit} bytes")
    return data


def _entry_points(
    archive: zipfile.ZipFile, member: str, label: str, names: list[str]
) -> list[EntryPointInfo]:
    if member not in names:
        return []
    try:
        text = _member(archive, member, label).decode("utf-8")
    except UnicodeDecodeError:
        raise PluginAdminError(f"{label}: entry_points.txt is not UTF-8 text") from None
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as error:
        first = " ".join(str(error).split())[:160]
        raise PluginAdminError(f"{label}: entry_points.txt cannot be read ({first})") from None
    if not parser.has_section(ENTRY_POINT_GROUP):
        return []
    points = []
    for ep_name, value in list(parser.items(ENTRY_POINT_GROUP))[:50]:
        value = " ".join(value.split())[:300]
        point = EntryPointInfo(ep_name.strip()[:100], value)
        module, _, attribute = value.split("[", 1)[0].partition(":")
        attribute = attribute.strip() or None
        source = _module_source(archive, module.strip(), names, label)
        if source is None or (attribute is not None and "." in attribute):
            point.readable = False  # a compiled module, or an attribute of an attribute
        else:
            try:
                point.api = declared_api(source, attribute)
            except ValueError:
                point.readable = False
        points.append(point)
    return points


def _module_source(archive: zipfile.ZipFile, module: str, names: list[str], label: str) -> bytes | None:
    """The source of ``module`` in the wheel (at its root or under ``*.data/purelib|platlib``)."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        return None
    stem = module.replace(".", "/")
    wanted = (f"{stem}.py", f"{stem}/__init__.py")
    for name in names:
        inner = re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", name)
        if inner in wanted:
            return _member(archive, name, label, MAX_MODULE_BYTES)
    return None


def _show_api(declared: Any) -> str:
    if isinstance(declared, range):
        return f"{declared.start} to {declared.stop - 1}" if len(declared) > 1 else str(declared.start)
    if isinstance(declared, (list, tuple, set, frozenset)):
        return ", ".join(str(v) for v in sorted(declared, key=str)[:10])
    return str(declared)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- installing -------------------------------------------------------------------------------------


@dataclass
class Planned:
    """A distribution pip would install, and the installed version it would replace."""

    name: str
    version: str
    replaces: str | None = None  # the installed version it replaces; None: new


@dataclass
class Prepared:
    """A checked wheel and pip's plan for it, waiting for the user's confirmation. Use it as a
    context manager (or call :meth:`close`) to remove its temporary folder."""

    spec: str
    wheel: WheelInfo
    plan: list[Planned]
    workdir: Path
    only_binary: bool = True
    closed: bool = False

    def summary(self) -> str:
        """What is about to be installed, for the user to confirm (plain text)."""
        wheel = self.wheel
        lines = [
            f"About to install the Latent Studio plugin {wheel.name} {wheel.version}"
            + (f": {wheel.summary}" if wheel.summary else "")
        ]
        lines.append(f"  wheel: {wheel.path.name} ({_size(wheel.size)}), sha256 {wheel.sha256}")
        for point in wheel.entry_points:
            lines.append(f"  entry point: {point.describe()}")
        runtime = [r for r in wheel.requires if "extra ==" not in r.replace('"', "").replace("'", "")]
        lines.append(f"  requires: {', '.join(runtime) if runtime else 'no other package'}")
        if wheel.requires_python:
            lines.append(f"  requires Python {wheel.requires_python}")
        lines.append("  pip will install:")
        for item in self.plan:
            change = f"replaces {item.replaces}" if item.replaces else "new"
            lines.append(f"    {item.name} {item.version} ({change})")
        lines.append(TRUST)
        return "\n".join(lines)

    def close(self) -> None:
        if not self.closed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.closed = True

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def prepare(
    spec: str,
    *,
    allow_build: bool = False,
    build_isolation: bool = True,
    from_web: bool = False,
    say: Callable[[str], None] | None = None,
) -> Prepared:
    """Turn ``spec`` into a checked wheel and ask pip what installing it would do (nothing is
    installed and none of the package's code runs, except a project's build script when ``spec``
    is a folder or source archive, or ``allow_build`` lets pip build from source).

    ``from_web``: only a name, a URL or a ``.whl`` already on the server, and never a build.
    """
    spec = _check_spec(spec)
    workdir = Path(tempfile.mkdtemp(prefix="latent-studio-install-"))
    try:
        wheel_path = _fetch_wheel(
            spec,
            workdir / "wheel",
            allow_build=allow_build and not from_web,
            build_isolation=build_isolation,
            from_web=from_web,
            say=say,
        )
        wheel = inspect_wheel(wheel_path)
        only_binary = not allow_build or from_web
        plan = _dry_run(wheel, workdir, only_binary)
        return Prepared(spec, wheel, plan, workdir, only_binary)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _check_spec(spec: str) -> str:
    spec = str(spec).strip()
    if not spec:
        raise PluginAdminError("say what to install: a package name, a .whl file, a folder or a URL")
    if len(spec) > MAX_SPEC or any(ord(c) < 32 for c in spec):
        raise PluginAdminError(f"the install spec must be one line of at most {MAX_SPEC} characters")
    if spec.startswith("-"):
        raise PluginAdminError(
            f"{spec[:60]!r} looks like a pip option; give a package name, file, folder or URL"
        )
    return spec


def _fetch_wheel(
    spec: str,
    folder: Path,
    *,
    allow_build: bool,
    build_isolation: bool,
    from_web: bool,
    say: Callable[[str], None] | None,
) -> Path:
    folder.mkdir(parents=True)
    url = "://" in spec
    path = Path(spec).expanduser()
    local = not url and (path.exists() or spec.endswith((".whl", *SOURCE_SUFFIXES)) or os.sep in spec)
    if local and not path.exists():
        raise PluginAdminError(f"no such file or folder: {spec}")
    if local and path.is_file() and path.name.endswith(".whl"):
        target = folder / path.name
        try:
            shutil.copyfile(path, target)
        except OSError as error:
            raise PluginAdminError(
                f"cannot read {path.name}: {error.strerror or type(error).__name__}"
            ) from None
        return target
    if local:
        if from_web:
            raise PluginAdminError(
                "the web app installs wheels only; build and install a project folder or source "
                "archive from the command line (launch.py plugins install)"
            )
        if not (path.is_dir() or path.name.endswith(SOURCE_SUFFIXES)):
            raise PluginAdminError(
                f"{path.name} is neither a wheel (.whl), a source archive nor a project folder"
            )
        if say:
            say(f"building a wheel from {spec} (this runs the project's build script)")
        options = ["--no-build-isolation"] if not build_isolation else []
        _pip(
            ["wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), *options, str(path)],
            f"cannot build a wheel from {spec}",
        )
    else:
        if say:
            say(f"fetching {spec} with pip")
        options = [] if allow_build else ["--only-binary", ":all:"]
        result = _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), *options, spec], None)
        if result.returncode != 0:
            reason = _pip_error(result)
            hint = (
                ""
                if allow_build or from_web
                else "; if it only exists as source, --allow-build lets pip build it (running its build script)"
            )
            raise PluginAdminError(f"pip could not fetch a wheel of {spec}: {reason}{hint}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise PluginAdminError(f"pip made {len(wheels)} wheels from {spec}, expected one")
    return wheels[0]


def _dry_run(wheel: WheelInfo, workdir: Path, only_binary: bool) -> list[Planned]:
    report = workdir / "report.json"
    _pip(
        [
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            *_binary(only_binary),
            _requirement(wheel),
        ],
        f"pip cannot install {wheel.name} {wheel.version}",
    )
    try:
        planned = json.loads(report.read_text(encoding="utf-8")).get("install") or []
    except (OSError, ValueError) as error:
        raise PluginAdminError(f"pip's install report cannot be read: {error}") from None
    installed = _installed()
    plan = []
    for item in planned:
        meta = item.get("metadata") or {}
        name, version = str(meta.get("name", "")), str(meta.get("version", ""))
        before = installed.get(normalize_name(name))
        plan.append(Planned(name, version, before))
    if not any(normalize_name(p.name) == normalize_name(wheel.name) for p in plan):
        raise PluginAdminError(
            f"{wheel.name} {wheel.version} is already installed; "
            f"uninstall it first to install it again (launch.py plugins uninstall {wheel.name})"
        )
    return plan


def _requirement(wheel: WheelInfo) -> str:
    """``NAME @ file:///...whl#sha256=...``: pip installs exactly the file that was checked."""
    return f"{wheel.name} @ {wheel.path.resolve().as_uri()}#sha256={wheel.sha256}"


def _binary(only_binary: bool) -> list[str]:
    return ["--only-binary", ":all:"] if only_binary else []


def _installed() -> dict[str, str]:
    """The installed distributions' versions by normalized name (the first found on the path, as
    Python imports them)."""
    importlib.invalidate_caches()
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
            if name and normalize_name(name) not in found:
                found[normalize_name(name)] = dist.version
        except Exception:  # a broken .dist-info: pip will say so
            continue
    return found


def install_prepared(prepared: Prepared, *, say: Callable[[str], None] | None = None) -> str:
    """Install a confirmed :class:`Prepared` wheel (see the module's docstring); returns the
    one-line result. Raises :class:`PluginAdminError` after rolling back when a step fails."""
    if prepared.closed:
        raise PluginAdminError("this install was already done or cancelled; check the package again")
    if not _install_lock.acquire(blocking=False):
        raise PluginAdminError("another plugin install is running; try again when it has finished")
    try:
        return _install(prepared, say or (lambda line: None))
    finally:
        _install_lock.release()
        prepared.close()


def _install(prepared: Prepared, say: Callable[[str], None]) -> str:
    wheel = prepared.wheel
    check_before = subprocess.Popen(
        _pip_command(["check"]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    kept_dir = data_dir() / "wheels"
    kept = kept_dir / wheel.path.name
    kept_before = kept.exists()
    try:
        backups = _back_up([item for item in prepared.plan if item.replaces], prepared.workdir / "backup")
    except OSError as error:
        check_before.kill()
        raise PluginAdminError(
            f"cannot save the installed packages {wheel.name} would replace, so it could not be "
            f"rolled back: {error.strerror or error}; nothing was changed"
        ) from None
    try:
        problems_before = set(_lines(check_before.communicate(timeout=PIP_TIMEOUT)[0]))
    except subprocess.TimeoutExpired:
        check_before.kill()
        problems_before = set()
    try:
        kept_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel.path, kept)
        wheel = WheelInfo(
            kept,
            wheel.name,
            wheel.version,
            wheel.summary,
            wheel.sha256,
            wheel.size,
            wheel.entry_points,
            wheel.requires,
            wheel.requires_python,
        )
    except OSError:  # no data folder: install from the temporary copy
        kept = None  # type: ignore[assignment]
        wheel = prepared.wheel
    say(f"installing {wheel.name} {wheel.version} with pip")
    result = _pip(["install", "--quiet", *_binary(prepared.only_binary), _requirement(wheel)], None)
    failure = None
    if result.returncode != 0:
        failure = f"pip could not install {wheel.name} {wheel.version}: {_pip_error(result)}"
    else:
        check = _pip(["check"], None)
        new = [line for line in _lines(check.stdout) if line not in problems_before]
        if check.returncode != 0 and new:
            failure = f"pip check failed after installing {wheel.name} {wheel.version}: {new[0]}"
    if failure is None:
        _enable_after_install(wheel.name)
        return (
            f"installed {wheel.name} {wheel.version} (sha256 {wheel.sha256}); it loads from the next start "
            "(restart a running server to load it)"
        )
    say(f"{failure}; rolling back")
    problems = _roll_back(prepared.plan, backups)
    if kept is not None and not kept_before:
        kept.unlink(missing_ok=True)
    if problems:
        raise PluginAdminError(f"{failure}; rolling back left problems: {'; '.join(problems)}")
    raise PluginAdminError(f"{failure}; rolled back, nothing was changed")


def _enable_after_install(name: str) -> None:
    """A package installed on purpose is meant to run: drop it from the disabled list."""
    try:
        settings = PluginSettings.load()
    except LatentStudioError:
        return  # an unreadable settings file is reported when the app starts
    key = normalize_name(name)
    kept = [entry for entry in settings.disabled if entry != key and not entry.startswith(f"{name}:")]
    if len(kept) != len(settings.disabled):
        settings.disabled = kept
        try:
            settings.save()
        except LatentStudioError:
            pass  # installed all the same; `plugins enable` says what is wrong with the file


@dataclass
class Backup:
    """The files of an installed distribution, saved before pip replaced it."""

    name: str
    version: str
    files: list[tuple[Path, Path]]  # (where it was installed, the saved copy)


def _back_up(replaced: list[Planned], folder: Path) -> list[Backup]:
    """Save the files of every installed distribution about to be replaced (hard links where the
    file system allows, else copies), so a rollback can put them back as they were."""
    backups = []
    by_name = {}
    for dist in metadata.distributions():
        try:
            by_name.setdefault(normalize_name(dist.metadata["Name"] or ""), dist)
        except Exception:
            continue
    for index, item in enumerate(replaced):
        dist = by_name.get(normalize_name(item.name))
        if dist is None or dist.version != item.replaces:
            continue
        files = []
        for number, file in enumerate(dist.files or []):
            source = Path(str(dist.locate_file(file))).resolve()
            if not source.is_file():
                continue
            saved = folder / str(index) / str(number)
            saved.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, saved)
            except OSError:
                shutil.copy2(source, saved)
            files.append((source, saved))
        backups.append(Backup(item.name, str(item.replaces), files))
    return backups


def _roll_back(plan: list[Planned], backups: list[Backup]) -> list[str]:
    """Uninstall what the failed install added or replaced, put the backups back; the problems left."""
    installed = _installed()
    changed = [
        item.name
        for item in plan
        if normalize_name(item.name) in installed and installed[normalize_name(item.name)] != item.replaces
    ]
    problems = []
    if changed:
        result = _pip(["uninstall", "--yes", "--quiet", *changed], None)
        if result.returncode != 0:
            problems.append(f"pip could not uninstall {', '.join(changed)}: {_pip_error(result)}")
    for backup in backups:
        try:
            for target, saved in backup.files:
                if target.exists() and (
                    os.path.samefile(target, saved) or filecmp.cmp(target, saved, shallow=False)
                ):
                    continue  # untouched (pip left a copy outside its environment alone)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(saved, target)
        except OSError as error:
            problems.append(f"cannot restore {backup.name} {backup.version}: {error.strerror or error}")
    installed = _installed()
    for item in plan:
        now = installed.get(normalize_name(item.name))
        if now != item.replaces:
            want = f"{item.name} {item.replaces}" if item.replaces else f"no {item.name}"
            problems.append(f"expected {want}, found {item.name} {now or 'missing'}")
    return problems


# -- uninstalling -----------------------------------------------------------------------------------


def uninstall(
    name: str, *, confirm: Callable[[str], bool] | None = None, say: Callable[[str], None] | None = None
) -> bool:
    """Uninstall the plugin package ``name`` with pip (``confirm`` asks first; None: do not ask).
    Returns False when the user said no."""
    say = say or (lambda line: None)
    name = _check_name(name)
    if name in BUILTIN_PLUGINS or name.startswith("webui.builtin."):
        raise PluginAdminError(f"{name} is built in: it is part of Latent Studio")
    candidates = discover()
    matches = match_candidates(name, candidates)
    dropins = [c for c in matches if c.source == "dropin"]
    if dropins:
        raise PluginAdminError(
            f"{dropins[0].name} is a drop-in file, not a package: delete {dropins[0].path} to remove it"
        )
    dists = sorted({c.distribution for c in matches if c.distribution})
    if not dists:
        if normalize_name(name) in _installed():
            raise PluginAdminError(
                f"{name} is installed but is not a Latent Studio plugin (it has no "
                f"{ENTRY_POINT_GROUP} entry point); use pip to remove it"
            )
        raise PluginAdminError(
            f"no installed plugin package is called {name!r} (installed: "
            f"{_listing([c for c in candidates if c.distribution])})"
        )
    if len(dists) > 1:
        raise PluginAdminError(f"{name!r} names plugins of several packages ({', '.join(dists)}); give one")
    dist = dists[0]
    version = next(c.version for c in matches if c.distribution == dist)
    if confirm is not None and not confirm(f"Uninstall the plugin package {dist} {version}? [y/N] "):
        say("not uninstalled")
        return False
    if not _install_lock.acquire(blocking=False):
        raise PluginAdminError("a plugin install is running; try again when it has finished")
    try:
        _pip(["uninstall", "--yes", "--quiet", dist], f"pip could not uninstall {dist}")
    finally:
        _install_lock.release()
    try:
        settings = PluginSettings.load()
        keys = {key for c in matches for key in c.keys}
        if any(entry in keys for entry in settings.disabled):
            settings.disabled = [entry for entry in settings.disabled if entry not in keys]
            settings.save()
    except LatentStudioError:
        pass  # reported when the app starts
    for kept in (data_dir() / "wheels").glob("*.whl"):
        if normalize_name(kept.name.split("-", 1)[0]) == normalize_name(dist):
            kept.unlink(missing_ok=True)
    say(
        f"uninstalled {dist} {version} (its dependencies stay installed); restart a running server to unload it"
    )
    return True


# -- pip ------------------------------------------------------------------------------------------


def _pip_command(arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *arguments]


def _pip(arguments: list[str], failure: str | None) -> subprocess.CompletedProcess[str]:
    """Run pip in the app's own Python; with ``failure``, a non-zero exit raises it with pip's reason."""
    try:
        result = subprocess.run(
            _pip_command(arguments),
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise PluginAdminError(
            f"pip {arguments[0]} took more than {PIP_TIMEOUT} seconds and was stopped"
        ) from None
    except OSError as error:
        raise PluginAdminError(f"cannot run pip: {error.strerror or error}") from None
    if failure is not None and result.returncode != 0:
        raise PluginAdminError(f"{failure}: {_pip_error(result)}")
    return result


def _pip_error(result: subprocess.CompletedProcess[str]) -> str:
    """pip's reason, on one line: its first ``ERROR:`` line, else its last line."""
    lines = _lines(result.stderr) or _lines(result.stdout)
    errors = [line for line in lines if line.startswith("ERROR:")]
    line = errors[0] if errors else lines[-1] if lines else f"exit status {result.returncode}"
    line = line.removeprefix("ERROR:").strip()
    return line if len(line) <= 300 else line[:299] + "…"


def _lines(text: str | None) -> list[str]:
    return [" ".join(line.split()) for line in (text or "").splitlines() if line.strip()]


def _size(size: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return str(size)


# -- a new plugin package ---------------------------------------------------------------------------


def _module_name(name: str) -> str:
    return normalize_name(name).replace("-", "_")


def new_plugin(name: str, parent: Path) -> Path:
    """Write a ready plugin package ``parent/name``: pyproject.toml with the entry point, a plugin
    module with one hook, a test using :mod:`webui.testing`, a README. It installs and passes its
    own test as it is."""
    name = str(name).strip()
    if not _NEW_NAME.match(name) or not 2 <= len(name) <= 64:
        raise PluginAdminError(
            f"{name[:80]!r} is not a package name: use letters, digits and single '-', '_' or "
            "'.' between them, starting with a letter (2 to 64 characters)"
        )
    module = _module_name(name)
    if keyword.iskeyword(module) or module in ("webui", "tests", "test", "plugins"):
        raise PluginAdminError(
            f"{name} would make a module called {module}, which is taken; choose another name"
        )
    if importlib.util.find_spec(module) is not None:
        raise PluginAdminError(f"a module called {module} is already installed here; choose another name")
    folder = Path(parent).expanduser() / name
    if folder.exists():
        raise PluginAdminError(f"{folder} already exists; choose another name or --dir")
    key = name.replace(".", "-")
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{module}/__init__.py": _INIT,
        f"{module}/plugin.py": _PLUGIN,
        "tests/conftest.py": _CONFTEST,
        "tests/test_plugin.py": _TEST,
        ".gitignore": "build/\ndist/\n*.egg-info/\n__pycache__/\n",
    }
    values = {
        "name": name,
        "module": module,
        "key": key,
        "api": str(API_VERSION),
        "attribute": API_ATTRIBUTE,
        "group": ENTRY_POINT_GROUP,
    }
    try:
        for relative, template in files.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            text = textwrap.dedent(template).lstrip("\n")
            for placeholder, value in values.items():
                text = text.replace(f"{{{{{placeholder}}}}}", value)
            path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise PluginAdminError(f"cannot write {folder}: {error.strerror or error}") from None
    return folder


_PYPROJECT = """
    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{{name}}"
    version = "0.1.0"
    description = "A Latent Studio plugin."
    readme = "README.md"
    requires-python = ">=3.10"
    dependencies = []  # Latent Studio is the host; the plugin imports only webui.api

    [project.optional-dependencies]
    test = ["pytest>=8"]  # the test uses Latent Studio's testing kit, webui.testing

    # what makes it a Latent Studio plugin: Latent Studio loads this module at start
    [project.entry-points.{{group}}]
    {{module}} = "{{module}}.plugin"

    [tool.setuptools]
    packages = ["{{module}}"]

    [tool.pytest.ini_options]
    testpaths = ["tests"]
"""

_INIT = '''
    """{{name}}: a Latent Studio plugin (the hooks are in plugin.py)."""
'''

_PLUGIN = '''
    """The plugin module named by the {{group}} entry point in pyproject.toml.

    Each function marked with @hookimpl implements the hook of the same name; the hooks and their
    arguments are listed in Latent Studio's docs/plugins.md ("Every hook, in one line") and
    webui/hookspecs.py. Import only from webui.api.
    """

    from __future__ import annotations

    from typing import Any

    from webui.api import GenerationRequest, OutputImage, RunContext, hookimpl

    # The plugin API versions this plugin is written for. Keep it a literal: `launch.py plugins
    # install` reads it from the wheel without running the plugin, and refuses a mismatch.
    {{attribute}} = {{api}}


    @hookimpl
    def write_metadata(parameters: dict[str, Any], image: OutputImage, request: GenerationRequest,
                       context: RunContext) -> None:
        """Record in every image's parameters (the PNG "parameters" text) that this plugin ran."""
        parameters["{{key}}"] = "on"
'''

_CONFTEST = """
    from __future__ import annotations

    import importlib.util
    import sys
    from pathlib import Path

    PACKAGE_ROOT = Path(__file__).resolve().parent.parent

    if importlib.util.find_spec("{{module}}") is None:  # not installed: test the sources
        sys.path.insert(0, str(PACKAGE_ROOT))
    if importlib.util.find_spec("webui") is None:
        raise RuntimeError("Latent Studio (webui) is not importable: run the tests from the Latent Studio "
                           "folder with `python -m pytest path/to/{{name}}/tests`")
"""

_TEST = '''
    """{{name}}'s tests, with Latent Studio's testing kit: offline, on the CPU, in seconds."""

    from __future__ import annotations

    from {{module}} import plugin

    from webui.testing import check_hooks, make_engine, run_task


    def test_the_hooks_fit_the_contract():
        check_hooks(plugin)  # hook names, arguments and the plugin API version


    def test_images_record_the_plugin():
        engine = make_engine(plugin)  # the built-ins, this plugin and a tiny random model
        for task in ("txt2img", "img2img"):
            result = run_task(engine, task, prompt="a red cat")
            assert result.images[0].image.size == (64, 64)
            assert "{{key}}: on" in result.infotexts[0]
'''

_README = """
    # {{name}}

    A Latent Studio plugin. It implements one hook, `write_metadata`, in
    `{{module}}/plugin.py`: every image records `{{key}}: on` in its parameters. Replace it with
    the hooks you need (see the "Every hook, in one line" table in Latent Studio's
    docs/plugins.md).

    ## Install

    From the Latent Studio folder:

        python launch.py plugins install path/to/{{name}}

    then restart Latent Studio; `python launch.py plugins list` shows it.

    ## Test

    From the Latent Studio folder (the tests import `webui.testing`):

        python -m pytest path/to/{{name}}/tests

    ## Publish

    The entry point in `pyproject.toml` (group `{{group}}`) is all Latent Studio needs to find
    the plugin. Build and upload it to PyPI:

        python -m pip install build twine
        python -m build
        python -m twine upload dist/*

    Users then install it by name: `python launch.py plugins install {{name}}`.
    `{{attribute}}` in `plugin.py` says which plugin API versions it is written for; keep it a
    literal number (or tuple), so the installer can read it without running the plugin.
"""
