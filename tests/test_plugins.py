"""Plugin discovery: built-ins, drop-in modules, entry points, a pip-installed example package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from components import bundle_from, sd_components

from webui.engine.pipeline import Engine
from webui.plugins import BUILTIN_PLUGINS, make_plugin_manager
from webui.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "latent-studio-example-plugin"


def test_builtins_are_plugins_with_their_hooks():
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[])
    rows = {row["name"]: row for row in pm.describe()}
    assert set(BUILTIN_PLUGINS) <= set(rows)
    assert all(rows[name]["error"] is None and rows[name]["source"] == "builtin" for name in BUILTIN_PLUGINS)
    assert "register_schedulers" in rows["webui.builtin.schedulers"]["hooks"]
    assert "load_model" in rows["webui.builtin.loaders"]["hooks"]
    assert rows["webui.builtin.masked_image"]["hooks"] == [
        "postprocess_images",
        "prepare_request",
        "provide_conditioning",
    ]


def test_no_global_manager_each_call_is_fresh():
    a = make_plugin_manager(entry_points=False, plugin_dirs=[])
    b = make_plugin_manager(entry_points=False, plugin_dirs=[])
    assert a is not b
    a.unregister(name="webui.builtin.schedulers")
    assert b.get_plugin("webui.builtin.schedulers") is not None


def test_dropin_modules_load_and_a_broken_one_is_reported(tmp_path):
    (tmp_path / "good.py").write_text(
        textwrap.dedent("""
        from diffusers import DDIMScheduler
        from webui.api import hookimpl
        __version__ = "1.2"

        @hookimpl
        def register_schedulers(register):
            register("DDIM Trailing", DDIMScheduler, timestep_spacing="trailing")
    """)
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "badhook.py").write_text(
        textwrap.dedent("""
        from webui.api import hookimpl

        @hookimpl
        def provide_conditioning(request, context, conditioning, not_an_argument):
            pass
    """)
    )
    (tmp_path / "_private.py").write_text("raise RuntimeError('never imported')\n")
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[tmp_path])
    rows = {row["name"]: row for row in pm.describe()}
    assert rows["plugins/good.py"]["error"] is None
    assert rows["plugins/good.py"]["version"] == "1.2"
    assert rows["plugins/good.py"]["hooks"] == ["register_schedulers"]
    assert "RuntimeError: boom at import" in rows["plugins/broken.py"]["error"]
    assert "not_an_argument" in rows["plugins/badhook.py"]["error"]
    assert "plugins/_private.py" not in rows
    engine = Engine(plugins=pm)
    assert "DDIM Trailing" in engine.schedulers
    assert engine.schedulers.get("DDIM Trailing").overrides == {"timestep_spacing": "trailing"}


def test_broken_entry_point_is_reported_and_others_still_load(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[latent_studio]\nbroken = no_such_module_xyz.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = make_plugin_manager(plugin_dirs=[])
    rows = {row["name"]: row for row in pm.describe()}
    assert "ModuleNotFoundError" in rows["broken-plugin:broken"]["error"]
    assert rows["broken-plugin:broken"]["version"] == "1.0"
    assert all(rows[name]["error"] is None for name in BUILTIN_PLUGINS)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example package, pip-installed into a target directory of its own."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # the build leaves files beside the sources: keep them out of the repo
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


@pytest.mark.slow
def test_pip_installed_plugin_is_listed_by_the_cli(installed_example):
    env = {**os.environ, "PYTHONPATH": str(installed_example), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "launch.py", "plugins"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    row = rows["latent-studio-example-plugin:example"]
    assert row == {
        "name": "latent-studio-example-plugin:example",
        "source": "entrypoint",
        "version": "0.3.0",
        "hooks": ["prepare_request", "register_schedulers", "write_metadata"],
        "error": None,
        "enabled": True,
        "status": "loaded",
        "distribution": "latent-studio-example-plugin",
        "api_versions": [1],
        "sha256": row["sha256"],
        "hashed": "RECORD",
    }
    record = next(installed_example.glob("latent_studio_example_plugin-*.dist-info")) / "RECORD"
    assert row["sha256"] == hashlib.sha256(record.read_bytes()).hexdigest()  # installed by pip, not by us
    samplers = subprocess.run(
        [sys.executable, "launch.py", "samplers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert "Euler Trailing" in samplers


@pytest.mark.slow
def test_pip_installed_plugin_is_used_by_the_engine(installed_example, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_example))
    engine = Engine(plugins=make_plugin_manager(plugin_dirs=[]))
    bundle = bundle_from(sd_components(tmp_path))
    base = dict(prompt="a house", steps=3, seed=9, width=64, height=64)

    def run(**kwargs):
        item = engine.generate(GenerationRequest(**{**base, **kwargs}), bundle=bundle).images[0]
        return np.asarray(item.image, dtype=np.int16), item.parameters["infotext"]

    euler, _ = run(sampler="Euler")
    trailing, text = run(sampler="Euler Trailing")
    assert "Sampler: Euler Trailing" in text
    assert np.abs(euler - trailing).max() > 0
    styled, styled_text = run(sampler="Euler", extra={"style": "watercolor"})
    assert "Style: watercolor" in styled_text
    assert np.abs(euler - styled).max() > 0
    sys.modules.pop("latent_studio_example.plugin", None)
    sys.modules.pop("latent_studio_example", None)


API_PLUGINS = {
    "future.py": "LATENT_STUDIO_API = 2",
    "both.py": "LATENT_STUDIO_API = (1, 2)",
    "legacy.py": "",  # declares nothing: loaded, as before versions were checked
    "wrong.py": "LATENT_STUDIO_API = '1'",
}
API_PLUGIN_BODY = """
from diffusers import DDIMScheduler
from webui.api import hookimpl
{declaration}

@hookimpl
def register_schedulers(register):
    register("DDIM {stem}", DDIMScheduler)
"""


def write_api_plugins(folder: Path) -> None:
    for name, declaration in API_PLUGINS.items():
        (folder / name).write_text(API_PLUGIN_BODY.format(declaration=declaration, stem=name[:-3]))


def test_a_plugin_for_another_api_version_is_not_loaded_and_says_why(tmp_path):
    write_api_plugins(tmp_path)
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[tmp_path])
    rows = {row["name"]: row for row in pm.describe()}
    assert rows["plugins/future.py"]["error"] == "needs plugin API 2; this Latent Studio provides API 1"
    assert rows["plugins/future.py"]["hooks"] == []
    assert pm.get_plugin("plugins/future.py") is None
    assert rows["plugins/wrong.py"]["error"] == (
        "declares LATENT_STUDIO_API = '1', which is neither a whole "
        "number nor a collection of them; this Latent Studio provides "
        "API 1"
    )
    assert pm.get_plugin("plugins/wrong.py") is None
    for name in ("plugins/both.py", "plugins/legacy.py"):
        assert rows[name]["error"] is None
        assert rows[name]["hooks"] == ["register_schedulers"]
    engine = Engine(plugins=pm)
    assert "DDIM both" in engine.schedulers and "DDIM legacy" in engine.schedulers
    assert "DDIM future" not in engine.schedulers and "DDIM wrong" not in engine.schedulers


@pytest.mark.slow
def test_the_cli_names_both_api_versions(tmp_path):
    write_api_plugins(tmp_path)
    env = {**os.environ, "LATENT_STUDIO_PLUGIN_DIRS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "launch.py", "plugins"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["plugins/future.py"] == {
        "name": "plugins/future.py",
        "source": "dropin",
        "version": None,
        "hooks": [],
        "error": "needs plugin API 2; this Latent Studio provides API 1",
        "enabled": True,
        "status": "failed",
        "distribution": None,
        "api_versions": [2],
        "hashed": "file",
        "sha256": hashlib.sha256((tmp_path / "future.py").read_bytes()).hexdigest(),
    }
    assert rows["plugins/legacy.py"]["error"] is None
    assert all(rows[name]["error"] is None for name in BUILTIN_PLUGINS)


def test_an_installed_plugin_for_other_api_versions_is_not_loaded(tmp_path, monkeypatch):
    (tmp_path / "future_plugin_xyz.py").write_text(
        API_PLUGIN_BODY.format(declaration="LATENT_STUDIO_API = range(2, 4)", stem="future")
    )
    dist = tmp_path / "future_plugin-3.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: future-plugin\nVersion: 3.0\n")
    (dist / "entry_points.txt").write_text("[latent_studio]\nfuture = future_plugin_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "future_plugin_xyz", raising=False)
    pm = make_plugin_manager(plugin_dirs=[])
    row = {row["name"]: row for row in pm.describe()}["future-plugin:future"]
    assert row == {
        "name": "future-plugin:future",
        "source": "entrypoint",
        "version": "3.0",
        "hooks": [],
        "error": "needs plugin API 2 to 3; this Latent Studio provides API 1",
        "enabled": True,
        "status": "failed",
        "distribution": "future-plugin",
        "api_versions": [2, 3],
        "sha256": None,
        "hashed": None,
    }  # no RECORD in this hand-made .dist-info
    assert "DDIM future" not in Engine(plugins=pm).schedulers


@pytest.mark.slow
def test_the_engine_and_plugin_api_never_import_gradio():
    code = "import sys, webui.api, webui.cli; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
