"""A broken plugin cannot take the app down: it is recorded, logged and shown, and the rest works.

Each plugin here is a drop-in module written into a temporary folder, the way a user installs one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from webui.engine.pipeline import Engine
from webui.errors import InvalidRequestError, PluginError
from webui.plugins import PLUGIN_DIRS_ENV, make_plugin_manager
from webui.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(prompt="a blue square", steps=2, seed=4, width=64, height=64, sampler="Euler")

EXITS = "import sys\nsys.exit(3)\n"
RAISES = "raise ValueError('missing setting: colour')\n"
GOOD = """
    from diffusers import DDIMScheduler
    from webui.api import hookimpl

    @hookimpl
    def register_schedulers(register):
        register("DDIM Good", DDIMScheduler)
"""
FAILS_AT_STARTUP = """
    from webui.api import hookimpl

    @hookimpl
    def startup(engine):
        raise RuntimeError("no licence file")
"""
FAILS_IN_REGISTRIES = """
    import sys
    from webui.api import hookimpl

    @hookimpl
    def register_schedulers(register):
        sys.exit("schedulers: giving up")

    @hookimpl
    def register_models(register, models_dir):
        raise OSError("cannot list models")
"""
FAILS_IN_TABS = """
    from webui.api import hookimpl

    @hookimpl
    def register_ui_tabs(register):
        raise KeyError("tab")
"""
FAILS_ON_REQUEST = """
    import sys
    from webui.api import hookimpl
    from webui.errors import InvalidRequestError

    @hookimpl
    def prepare_request(request, context):
        if request.prompt == "invalid":
            raise InvalidRequestError("this plugin needs a style")

    @hookimpl
    def provide_conditioning(request, context):
        if request.prompt == "boom":
            raise ValueError("boom")

    @hookimpl
    def on_step(step):
        if step.context.request.prompt == "exit" and step.step == 2:
            sys.exit(7)
"""


def dropins(folder: Path, **modules: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def manager(folder: Path):
    return make_plugin_manager(entry_points=False, plugin_dirs=[folder])


def errors(pm) -> dict[str, str | None]:
    return {row["name"]: row["error"] for row in pm.describe()}


def test_exit_or_error_at_import_is_recorded_with_the_plugin_name(tmp_path, caplog):
    folder = dropins(
        tmp_path / "plugins", exits=EXITS, raises=RAISES, odd="raise BaseException('odd')\n", good=GOOD
    )
    with caplog.at_level(logging.WARNING, logger="webui.plugins"):
        pm = manager(folder)
    found = errors(pm)
    assert found["plugins/exits.py"] == "SystemExit: 3 (at import, exits.py:2)"
    assert found["plugins/raises.py"] == "ValueError: missing setting: colour (at import, raises.py:1)"
    assert found["plugins/odd.py"] == "BaseException: odd (at import, odd.py:1)"
    assert found["plugins/good.py"] is None
    assert "latent_studio_dropin_exits" not in sys.modules
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "plugin 'plugins/exits.py' failed to load: SystemExit: 3 (at import, exits.py:2)" in warnings
    assert len(warnings) == 3
    assert "DDIM Good" in Engine(plugins=pm).schedulers  # the good plugin works


def test_keyboard_interrupt_at_import_is_not_swallowed(tmp_path):
    folder = dropins(tmp_path / "plugins", stop="raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        manager(folder)


def test_failing_startup_hooks_are_recorded_and_the_engine_and_app_still_build(tmp_path, caplog):
    import gradio as gr

    from webui.ui.app import build_app
    from webui.ui.service import StudioService

    folder = dropins(
        tmp_path / "plugins",
        startup=FAILS_AT_STARTUP,
        registries=FAILS_IN_REGISTRIES,
        tabs=FAILS_IN_TABS,
        exits=EXITS,
        good=GOOD,
    )
    with caplog.at_level(logging.WARNING, logger="webui.plugins"):
        pm = manager(folder)
        engine = Engine(plugins=pm, models_dir=str(ROOT / "models"))
        assert "DDIM Good" in engine.schedulers and "Euler" in engine.schedulers
        models = [entry.name for entry in engine.models.list("checkpoint")]
        engine.models.list("checkpoint")  # a second refresh: the same failure is not logged twice
        demo = build_app(StudioService(engine, tmp_path / "outputs"))
    assert models  # the shipped model is still listed by the built-in lister
    found = errors(pm)
    assert found["plugins/startup.py"] == "RuntimeError: no licence file (in startup, startup.py:6)"
    assert found["plugins/registries.py"] == (
        "SystemExit: schedulers: giving up (in register_schedulers, "
        "registries.py:7); OSError: cannot list models (in "
        "register_models, registries.py:11)"
    )
    assert found["plugins/tabs.py"] == "KeyError: 'tab' (in register_ui_tabs, tabs.py:6)"
    assert found["plugins/good.py"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "plugin 'plugins/startup.py' failed in startup and was skipped: "
        "RuntimeError: no licence file (in startup, startup.py:6)"
    ) in warnings
    assert len(warnings) == 5  # exits.py at import, then one per failed hook

    labels = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert labels == [
        "Text to image",
        "Image to image",
        "Inpainting",
        "Segmentation to image",
        "Extras",
        "PNG Info",
        "Plugins",
    ]
    blocks = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    notice = blocks["plugin-notice"].value
    assert notice.startswith("⚠️ **4 plugins failed to load:** plugins\\/exits\\.py — SystemExit\\: 3 ")
    assert unescape(notice).endswith(
        "plugins/tabs.py — KeyError: 'tab' (in register_ui_tabs, tabs.py:6) — see the Plugins tab."
    )
    table = blocks["plugins-table"].value
    assert table["headers"][:5] == ["Name", "Source", "Version", "Hooks", "Status"]
    by_name = {row[0]: row for row in table["data"]}
    assert by_name["plugins/startup.py"][:5] == [
        "plugins/startup.py",
        "dropin",
        "",
        "startup",
        "failed: RuntimeError: no licence file (in startup, startup.py:6)",
    ]
    assert by_name["plugins/exits.py"][3:5] == ["", "failed: SystemExit: 3 (at import, exits.py:2)"]
    assert by_name["plugins/good.py"][3:5] == ["register_schedulers", "loaded"]
    assert by_name["webui.builtin.ui_tabs"][1:5] == [
        "builtin",
        by_name["webui.builtin.ui_tabs"][2],
        "register_ui_tabs",
        "loaded",
    ]


def unescape(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown).replace("**", "")


def test_the_notice_is_plain_text_even_when_an_error_holds_markup(tmp_path):
    from webui.ui.tabs.plugins import notice

    folder = dropins(
        tmp_path / "plugins", inject="raise RuntimeError('<img src=x onerror=alert(1)> *b* [l](j:x)')\n"
    )
    pm = manager(folder)
    text = notice(pm)
    assert text is not None
    assert (
        re.search(r"(?<!\\)[<>\[\]()`*_]", text.replace("**", "", 2)) is None
    )  # every markup character escaped
    assert unescape(text) == (
        "⚠️ 1 plugin failed to load: plugins/inject.py — RuntimeError: <img src=x "
        "onerror=alert(1)> *b* [l](j:x) (at import, inject.py:1) — see the Plugins tab."
    )
    assert notice(make_plugin_manager(entry_points=False, plugin_dirs=[])) is None


def test_request_hook_errors_name_the_plugin_and_the_engine_goes_on(tmp_path, bundle):
    engine = Engine(plugins=manager(dropins(tmp_path / "plugins", bad=FAILS_ON_REQUEST)))
    with pytest.raises(PluginError) as failed:
        engine.generate(GenerationRequest(**{**BASE, "prompt": "boom"}), bundle=bundle)
    assert str(failed.value) == "plugin 'plugins/bad.py' failed in provide_conditioning: ValueError: boom"
    assert isinstance(failed.value.__cause__, ValueError)
    with pytest.raises(PluginError) as exited:
        engine.generate(GenerationRequest(**{**BASE, "prompt": "exit"}), bundle=bundle)
    assert str(exited.value) == "plugin 'plugins/bad.py' failed in on_step: SystemExit: 7"
    # an error meant for the user goes through as it is
    with pytest.raises(InvalidRequestError, match="^this plugin needs a style$"):
        engine.generate(GenerationRequest(**{**BASE, "prompt": "invalid"}), bundle=bundle)
    result = engine.generate(GenerationRequest(**BASE), bundle=bundle)
    reference = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[])).generate(
        GenerationRequest(**BASE), bundle=bundle
    )
    assert np.array_equal(np.asarray(result.images[0].image), np.asarray(reference.images[0].image))


def test_functions_a_plugin_returns_name_the_plugin_when_they_fail(tmp_path, bundle):
    folder = dropins(
        tmp_path / "plugins",
        wraps="""
        from webui.api import hookimpl, InvalidRequestError

        @hookimpl
        def wrap_denoiser(request, context):
            def wrap(call):
                if request.prompt == "bad wrap":
                    raise KeyError("wrap")

                def run(model_input, step):
                    if request.prompt == "bad call" and step.index == 1:
                        raise ValueError("boom at step 2")
                    if request.prompt == "user":
                        raise InvalidRequestError("pick a smaller weight")
                    return call(model_input, step)

                return run

            return wrap

        @hookimpl
        def wrap_guidance(request, context):
            if request.prompt == "bad guidance":
                return lambda combine: lambda *args: 1 / 0
    """,
    )
    engine = Engine(plugins=manager(folder))
    expected = {
        "bad wrap": "plugin 'plugins/wraps.py' failed in the function its wrap_denoiser returned: KeyError: 'wrap'",
        "bad call": "plugin 'plugins/wraps.py' failed in the function its wrap_denoiser returned: "
        "ValueError: boom at step 2",
        "bad guidance": "plugin 'plugins/wraps.py' failed in the function its wrap_guidance returned: "
        "ZeroDivisionError: division by zero",
    }
    for prompt, message in expected.items():
        with pytest.raises(PluginError) as failed:
            engine.generate(GenerationRequest(**{**BASE, "prompt": prompt, "cfg_scale": 5.0}), bundle=bundle)
        assert str(failed.value) == message
    with pytest.raises(InvalidRequestError, match="^pick a smaller weight$"):
        engine.generate(GenerationRequest(**{**BASE, "prompt": "user"}), bundle=bundle)
    assert engine.generate(GenerationRequest(**BASE), bundle=bundle).images  # and it goes on


def test_interrupts_and_out_of_memory_from_a_plugin_keep_their_meaning(tmp_path, bundle):
    folder = dropins(
        tmp_path / "plugins",
        signals="""
        import torch
        from webui.api import hookimpl

        failures = [1]

        @hookimpl
        def provide_conditioning(request, context):
            if request.prompt == "stop":
                context.control.interrupt()
                context.control.check()

        @hookimpl
        def on_step(step):
            if step.context.request.prompt == "oom" and step.step == 2 and failures:
                failures.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    """,
    )
    engine = Engine(plugins=manager(folder))
    stopped = engine.generate(GenerationRequest(**{**BASE, "prompt": "stop"}), bundle=bundle)
    assert stopped.interrupted and stopped.images == []
    retried = engine.generate(GenerationRequest(**{**BASE, "prompt": "oom"}), bundle=bundle)
    assert retried.images[0].parameters["Memory"] == "tiled VAE (retried after running out of memory)"


def test_wrappers_and_partial_arguments_still_work(tmp_path, bundle):
    folder = dropins(
        tmp_path / "plugins",
        wrappers="""
        from webui.api import hookimpl

        calls = []

        @hookimpl(hookwrapper=True)
        def write_metadata(parameters):
            calls.append("old-style before")
            yield
            parameters["Wrapped"] = "old"

        @hookimpl(wrapper=True)
        def postprocess_images(images):
            calls.append("new-style before")
            result = yield
            calls.append(len(images))
            return result

        @hookimpl
        def prepare_request(request):  # only the argument it uses
            calls.append(request.prompt)
    """,
    )
    engine = Engine(plugins=manager(folder))
    text = engine.generate(GenerationRequest(**BASE), bundle=bundle).infotexts[0]
    assert text.splitlines()[-1].endswith(", Wrapped: old")
    assert sys.modules["latent_studio_dropin_wrappers"].calls == [
        "a blue square",
        "new-style before",
        1,
        "old-style before",
    ]


def launch(*args: str, plugin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", PLUGIN_DIRS_ENV: str(plugin_dir)}
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_cli_plugins_prints_json_and_exits_0_when_a_plugin_exits_at_import(tmp_path):
    folder = dropins(tmp_path / "plugins", exits=EXITS, good=GOOD)
    process = launch("plugins", plugin_dir=folder)
    assert process.returncode == 0, process.stderr
    rows = {row["name"]: row for row in json.loads(process.stdout)}
    assert rows["plugins/exits.py"] == {
        "name": "plugins/exits.py",
        "source": "dropin",
        "version": None,
        "hooks": [],
        "error": "SystemExit: 3 (at import, exits.py:2)",
        "enabled": True,
        "status": "failed",
        "distribution": None,
        "api_versions": None,
        "sha256": rows["plugins/exits.py"]["sha256"],
        "hashed": "file",
    }
    assert rows["plugins/good.py"]["error"] is None
    assert rows["webui.builtin.text"]["error"] is None
    assert process.stderr.strip() == (
        "plugin 'plugins/exits.py' failed to load: SystemExit: 3 (at import, exits.py:2)"
    )


@pytest.mark.slow
def test_cli_generate_names_the_plugin_that_failed(tmp_path, tiny_model_dir):
    folder = dropins(tmp_path / "plugins", exits=EXITS, bad=FAILS_ON_REQUEST)
    out = tmp_path / "out"
    process = launch(
        "generate",
        "--prompt",
        "boom",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        plugin_dir=folder,
    )
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == [
        "plugin 'plugins/exits.py' failed to load: SystemExit: 3 (at import, exits.py:2)",
        "plugin 'plugins/bad.py' failed in provide_conditioning: ValueError: boom",
        "error: plugin 'plugins/bad.py' failed in provide_conditioning: ValueError: boom",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_server_shows_the_failures_and_still_generates(tmp_path):
    from gradio_client.exceptions import AppError
    from ui_server import Server, call

    folder = dropins(
        tmp_path / "plugins",
        exits=EXITS,
        tabs=FAILS_IN_TABS,
        bad=FAILS_ON_REQUEST,
        inject="raise RuntimeError('<script>alert(1)</script>')\n",
    )
    server = Server(tmp_path / "outputs", plugin_dirs=[folder])
    try:
        response = httpx.get(server.url + "config", timeout=60)
        assert response.status_code == 200
        components = {c["props"].get("elem_id"): c for c in response.json()["components"]}
        notice = components["plugin-notice"]["props"]["value"]
        assert "<script>" not in notice and "\\<script\\>" in notice
        assert unescape(notice) == (
            "⚠️ 3 plugins failed to load: plugins/exits.py — SystemExit: 3 (at import, exits.py:2); "
            "plugins/inject.py — RuntimeError: <script>alert(1)</script> (at import, inject.py:1); "
            "plugins/tabs.py — KeyError: 'tab' (in register_ui_tabs, tabs.py:6) — see the Plugins tab."
        )
        tabs = [c["props"]["label"] for c in response.json()["components"] if c["type"] == "tabitem"]
        assert tabs[-2:] == ["PNG Info", "Plugins"]
        table = components["plugins-table"]["props"]["value"]
        statuses = {row[0]: row[4] for row in table["data"]}
        assert statuses["plugins/exits.py"] == "failed: SystemExit: 3 (at import, exits.py:2)"
        assert statuses["plugins/bad.py"] == "loaded"
        assert statuses["webui.builtin.text"] == "loaded"

        client = server.client()
        progress = call(client, "txt2img", Prompt="a red circle", Steps=2, **{"Seed (-1 = random)": 1})[0]
        assert progress.startswith("1 image(s)")
        with pytest.raises(
            AppError,
            match=r"plugin 'plugins/bad\.py' failed in provide_conditioning: "
            r"ValueError: boom",
        ):
            call(client, "txt2img", Prompt="boom", Steps=2)
        assert call(client, "txt2img", Prompt="a red circle", Steps=2)[0].startswith("1 image(s)")
    finally:
        server.close()
