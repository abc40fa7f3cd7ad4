"""Wheels made in the tests: hand-written zips (fast, exactly what a test needs, broken on purpose
where it needs that) and the example plugin built with pip; and a throwaway virtual environment."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "latent-studio-example-plugin"

# a plugin module that says so on disk when it is ever imported (it must not be, when refused)
IMPORT_MARKER = """
import os, pathlib
pathlib.Path(os.environ["LS_IMPORT_MARKER"]).write_text("{name} was imported")
"""


def write_wheel(
    folder: Path,
    name: str,
    version: str,
    files: Mapping[str, str],
    *,
    entry_points: str | None = None,
    requires: Iterable[str] = (),
) -> Path:
    """A py3-none-any wheel of ``files`` (path -> text), with METADATA, WHEEL, RECORD and, when
    given, ``entry_points.txt`` (its text)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: a test package\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    contents = {path: textwrap.dedent(text).lstrip("\n") for path, text in files.items()}
    contents[f"{info}/METADATA"] = metadata
    contents[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if entry_points is not None:
        contents[f"{info}/entry_points.txt"] = textwrap.dedent(entry_points).lstrip("\n")
    record = []
    for path, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in contents.items():
            archive.writestr(path, text)
    return wheel


def plugin_wheel(
    folder: Path,
    name: str,
    version: str = "1.0",
    *,
    body: str = "",
    api: str = "1",
    requires: Iterable[str] = (),
    module: str | None = None,
) -> Path:
    """A plugin package: module ``module`` (default: from ``name``) with ``LATENT_STUDIO_API = api``,
    ``body``, and a ``latent_studio`` entry point naming it."""
    module = module or name.replace("-", "_")
    source = f"LATENT_STUDIO_API = {api}\n{textwrap.dedent(body)}"
    return write_wheel(
        folder,
        name,
        version,
        {f"{module}/__init__.py": f'VERSION = "{version}"\n', f"{module}/plugin.py": source},
        entry_points=f"[latent_studio]\n{module} = {module}.plugin\n",
        requires=requires,
    )


def build_example_wheel(folder: Path, example: Path = EXAMPLE) -> Path:
    """An example plugin's wheel (default: examples/latent-studio-example-plugin), built by pip
    offline from a copy of its sources (the build leaves files beside them)."""
    source = folder / "src" / example.name
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    before = set(folder.glob("*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(folder),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (built,) = set(folder.glob("*.whl")) - before
    return built


class Venv:
    """A throwaway virtual environment that sees this Python's packages (torch, gradio: nothing is
    downloaded) but installs into its own folder; pip comes from the packages it sees.

    ``env``: offline pip (``PIP_NO_INDEX``, wheels found in ``find_links``), the user data folder
    ``home`` (settings, kept wheels) and an empty drop-in folder."""

    def __init__(self, folder: Path, find_links: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder / "venv")],
            check=True,
            timeout=300,
        )
        self.python = folder / "venv" / "bin" / "python"
        self.home = folder / "home"
        dropins = folder / "dropins"
        dropins.mkdir()
        self.env = {
            **os.environ,
            "LATENT_STUDIO_HOME": str(self.home),
            "LATENT_STUDIO_PLUGIN_DIRS": str(dropins),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(find_links),
            "PIP_NO_CACHE_DIR": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for name in ("LATENT_STUDIO_SAFE_MODE", "LATENT_STUDIO_PLUGINS", "PYTHONPATH"):
            self.env.pop(name, None)

    def launch(
        self, *args: str, stdin: str | None = None, timeout: int = 300
    ) -> subprocess.CompletedProcess[str]:
        """``launch.py`` with this environment's Python."""
        return subprocess.run(
            [str(self.python), "launch.py", *args],
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def version(self, name: str) -> str | None:
        """The installed version of distribution ``name`` as this environment sees it."""
        code = (
            "import importlib.metadata as m, sys\ntry: print(m.version(sys.argv[1]))\n"
            "except m.PackageNotFoundError: print('')"
        )
        return self.run("-c", code, name).stdout.strip() or None
