"""The package as users get it: pip-installed, found through its entry point, listed by
``launch.py plugins``, its fields offered as ``launch.py generate`` flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import webui

PACKAGE = Path(__file__).resolve().parent.parent
HOST = Path(webui.__file__).resolve().parent.parent  # where webui is imported from

pytestmark = pytest.mark.slow  # pip installs the package and runs the command line in subprocesses


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package pip-installed (offline, no dependencies) into a target folder of its own."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / PACKAGE.name
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return target


def latent_studio(installed: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(HOST)]), "HF_HUB_OFFLINE": "1"}
    env.pop("LATENT_STUDIO_SAFE_MODE", None)
    env.pop("LATENT_STUDIO_PLUGINS", None)
    command = "import sys; from webui.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout


def test_the_installed_plugin_is_listed_and_loaded(installed):
    rows = {row["name"]: row for row in json.loads(latent_studio(installed, "plugins"))}
    row = rows["latent-studio-sketch-plugin:sketch"]
    assert (row["source"], row["status"], row["error"]) == ("entrypoint", "loaded", None)
    assert row["api_versions"] == [1]
    assert row["hooks"] == [
        "prepare_request",
        "provide_conditioning",
        "register_fields",
        "register_tasks",
        "register_ui_tabs",
    ]


def test_the_fields_are_command_line_flags(installed):
    text = " ".join(latent_studio(installed, "generate", "--help").split())
    assert "one of txt2img, img2img, inpaint, seg2img, sketch2img" in text
    for flag in (
        "--sketch PATH",
        "--sketch-photo PATH",
        "--sketch-controlnet",
        "--sketch-weight FLOAT",
        "--sketch-invert {auto,always,never}",
        "--sketch-low-threshold INT",
    ):
        assert flag in text
