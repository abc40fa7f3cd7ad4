"""The package: pyproject.toml is the one list of dependencies, it declares everything the code
imports, and a wheel built from it installs into a fresh virtual environment and generates an image
from any folder, keeping its files in the user's data folder and nothing in site-packages."""

from __future__ import annotations

import ast
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def project() -> dict[str, Any]:
    """pyproject.toml's [project] table."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    listed = project()["dependencies"] if extra is None else project()["optional-dependencies"][extra]
    found = {}
    for text in listed:
        requirement = Requirement(text)
        found[_canonical(requirement.name)] = requirement
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- one list of dependencies ---------------------------------------------------------------------


def test_requirements_files_point_to_pyproject():
    """requirements*.txt install the project itself (editable, so a checkout runs from source) with
    the extras they need; not one package is named in two places."""
    extras = set(project()["optional-dependencies"])
    files = sorted(ROOT.glob("requirements*.txt"))
    assert ROOT / "requirements.txt" in files and ROOT / "requirements-dev.txt" in files
    for path in files:
        lines = [line.strip() for line in path.read_text().splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        assert len(lines) == 1, f"{path.name}: {lines}"
        match = re.fullmatch(r"-e \.(?:\[([a-z0-9,-]+)\])?", lines[0])
        assert match, f"{path.name}: {lines[0]!r} is not `-e .` or `-e .[extras]`"
        asked = set(match.group(1).split(",")) if match.group(1) else set()
        assert asked <= extras, f"{path.name} asks for extras pyproject.toml lacks: {asked - extras}"
        if path.name == "requirements.txt":
            assert not asked, "requirements.txt installs the app alone"


def test_the_installed_versions_are_in_the_declared_ranges():
    """The ranges say what the code is tested with: this environment satisfies every one of them."""
    for extra in (None, "test"):
        for name, requirement in requirements(extra).items():
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pytest.fail(f"{name} is declared but not installed")
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{name} {version} vs {requirement}"
            )
    gradio = requirements()["gradio"].specifier
    assert not gradio.contains("5.50") and gradio.contains("6.31.0")  # the UI is written for gradio 6


def _imported_distributions(folder: Path) -> dict[str, set[str]]:
    """The installed distributions that the modules in ``folder`` import, with the files importing each."""
    mapping = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("webui", "training"):
                    continue
                for dist in mapping.get(top, [top]):
                    found.setdefault(_canonical(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_of_the_package_is_declared():
    """What webui/ imports is a dependency or an extra's (xformers); what training/ imports, a
    dependency or the train extra's."""
    everything = set(requirements())
    for extra in project()["optional-dependencies"]:
        everything |= set(requirements(extra))
    imported = _imported_distributions(ROOT / "webui")
    missing = {dist: files for dist, files in imported.items() if dist not in everything}
    assert not missing, f"imported but not in pyproject.toml: {missing}"
    assert "gradio" in imported and "torch" in imported  # the scan sees the imports at all
    if (ROOT / "training").is_dir():
        allowed = set(requirements()) | set(requirements("train"))
        missing = {
            dist: files
            for dist, files in _imported_distributions(ROOT / "training").items()
            if dist not in allowed
        }
        assert not missing, (
            f"training/ imports what neither the dependencies nor the train extra list: {missing}"
        )


# -- the wheel ------------------------------------------------------------------------------------

SOURCE = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "webui", "models/latent-studio-shapes")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (bytecode caches aside:
    those are Python's, written by pip at install time)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.slow
def test_the_wheel_installs_and_generates_from_any_folder(tmp_path):
    # 1. build the wheel from a copy of the sources (the checkout gets no build/ or egg-info)
    source = tmp_path / "source"
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    (source / "models" / "README.md").write_text("other models are never packaged\n")
    (source / "models" / "latent-studio-shapes" / "unet" / ".model_hash").write_text("a local hash stamp\n")
    (source / "models" / "someone-elses-model").mkdir()
    (source / "models" / "someone-elses-model" / "model_index.json").write_text("{}")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("latent_studio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "webui/shipped_models/latent-studio-shapes/unet/diffusion_pytorch_model.safetensors" in names
    assert "webui/configs/sd1.json" in names and "webui/__main__.py" in names
    assert "webui/engine/csrc/cpu_attention.cpp" in names  # compiled on first use
    assert not [n for n in names if "someone-elses-model" in n or n.startswith("webui/shipped_models/README")]
    assert not [n for n in names if n.startswith(("tests/", "training/", "launch.py")) or "/." in n]

    # 2. a fresh virtual environment; torch and the other dependencies come from this system's
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=300,
    )
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # this system's pip, run by the venv's python, installs into the venv (even when this system has
    # the checkout installed in editable mode: --force-reinstall puts the wheel's copy in the venv)
    installed = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "install",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert site.is_relative_to(venv) and site != Path(sysconfig.get_path("purelib"))
    before = _snapshot(site)

    # 3. from another folder, a home of its own, no checkout in sight
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LATENT_STUDIO_", "XDG_")) and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(tmp_path / "xdg-data"),
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    data = tmp_path / "xdg-data" / "latent-studio"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, check=False
        )

    where = run(
        str(python), "-c", "import webui, webui.paths as p; print(webui.__file__); print(p.data_dir())"
    )
    assert where.returncode == 0, where.stderr
    module, folder = where.stdout.split("\n")[:2]
    assert Path(module) == site / "webui" / "__init__.py"  # the wheel's copy, not the checkout
    assert Path(folder) == data

    scripts = Path(sysconfig.get_path("scripts", vars={"base": str(venv), "platbase": str(venv)}))
    command = scripts / ("latent-studio.exe" if os.name == "nt" else "latent-studio")
    assert command.is_file()
    generated = run(str(command), "generate", "--prompt", "a blue square", "--steps", "2", "--seed", "7")
    assert generated.returncode == 0, generated.stderr
    assert "Traceback" not in generated.stderr
    printed = [Path(line) for line in generated.stdout.splitlines() if line.strip()]
    assert len(printed) == 1 and printed[0].is_file() and printed[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    today = datetime.date.today()
    assert printed[0].parent.parent == data / "outputs" / "txt2img"
    assert printed[0].parent.name in {today.isoformat(), (today - datetime.timedelta(days=1)).isoformat()}
    model = data / "models" / "latent-studio-shapes"
    assert (model / "model_index.json").is_file() and (model / "unet" / ".model_hash").is_file()

    listed = run(str(python), "-m", "webui", "models")  # python -m webui: the same command line
    assert listed.returncode == 0, listed.stderr
    sources = [Path(json.loads(line)["source"]) for line in listed.stdout.splitlines() if line.strip()]
    assert model in sources

    assert _snapshot(site) == before, "nothing may be written into site-packages"
    assert list(elsewhere.iterdir()) == []  # nor into the folder it was started from
