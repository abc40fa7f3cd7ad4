"""The Plugins tab's routes over HTTP: a real ``launch.py`` server in a throwaway virtual environment
installs an uploaded wheel, disables a drop-in, and "Apply and restart" brings the same process back
on the same port with the changes loaded; a server others can reach has no route that changes
plugins at all."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from ui_server import Server, free_port
from wheels import ROOT, Venv, build_example_wheel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MANAGING = ("plugins_check", "plugins_install", "plugins_enable", "plugins_disable", "plugins_restart")
SAMPLER = """
from diffusers import DDIMScheduler
from webui.api import hookimpl

@hookimpl
def register_schedulers(register):
    register("DDIM {name}", DDIMScheduler)
"""


class LaunchedServer:
    """``python launch.py`` in a subprocess, its output read line by line as it comes."""

    def __init__(self, venv: Venv, outputs: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen(
            [str(venv.python), "launch.py", "--port", str(self.port), "--outputs-dir", str(outputs), *flags],
            cwd=ROOT,
            env=venv.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # end of output

    def wait_for(self, text: str, timeout: float = 300) -> str:
        """The next output line containing ``text``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
            if line == "" and self.process.poll() is not None:
                break
        raise AssertionError(f"no line with {text!r}; the server said:\n" + "\n".join(self.seen[-30:]))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def components(url: str) -> dict[str, dict]:
    config = httpx.get(url + "config", timeout=60).json()
    return {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}


def choices_anywhere(url: str) -> set[str]:
    config = httpx.get(url + "config", timeout=60).json()
    found = set()
    for component in config["components"]:
        for choice in component["props"].get("choices") or []:
            found.add(str(choice[0] if isinstance(choice, (list, tuple)) else choice))
    return found


def statuses(url: str) -> dict[str, str]:
    return {row[0]: row[4] for row in components(url)["plugins-table"]["props"]["value"]["data"]}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    wheels = tmp_path_factory.mktemp("wheels")
    build_example_wheel(wheels)
    venv = Venv(tmp_path_factory.mktemp("venv"), wheels)
    venv.wheels = wheels
    return venv


def test_install_disable_and_apply_and_restart_from_the_web(venv, tmp_path):
    from gradio_client import Client, handle_file

    dropins = Path(venv.env["LATENT_STUDIO_PLUGIN_DIRS"])
    for name in ("keep", "drop"):
        (dropins / f"{name}.py").write_text(SAMPLER.format(name=name))
    wheel = next(venv.wheels.glob("latent_studio_example_plugin-*.whl"))
    server = LaunchedServer(venv, tmp_path / "outputs")
    try:
        assert server.wait_for("running at") == f"Latent Studio is running at {server.url}"
        pid = server.process.pid
        assert statuses(server.url)["plugins/drop.py"] == "loaded"
        assert {"DDIM keep", "DDIM drop"} <= choices_anywhere(server.url)
        assert "Euler Trailing" not in choices_anywhere(server.url)

        client = Client(server.url, verbose=False)
        message, table = client.predict("plugins/drop.py", api_name="/plugins_disable")
        assert message.startswith("disabled plugins/drop.py: it is not loaded from the next start")
        assert {row[0]: row[4] for row in table["data"]}[
            "plugins/drop.py"
        ] == "loaded; disabled from the next start"

        plan = client.predict("", handle_file(str(wheel)), api_name="/plugins_check")[0]
        assert plan.startswith("About to install the Latent Studio plugin latent-studio-example-plugin 0.3.0")
        assert "entry point: example = latent_studio_example.plugin (plugin API 1)" in plan
        assert "A plugin runs inside Latent Studio with the app's rights" in plan
        assert venv.version("latent-studio-example-plugin") is None  # checking installs nothing
        done, *updates = client.predict(api_name="/plugins_install")
        assert done.startswith("installed latent-studio-example-plugin 0.3.0 (sha256 ")
        assert venv.version("latent-studio-example-plugin") == "0.3.0"
        table = next(update for update in updates if isinstance(update, dict) and "data" in update)
        assert {row[0]: row[4] for row in table["data"]}["latent-studio-example-plugin:example"] == (
            "installed: loads after a restart"
        )

        assert (
            client.predict(api_name="/plugins_restart")
            == "Restarting: the page reloads when the server is back."
        )
        server.wait_for("Restarting Latent Studio...")
        assert (
            server.wait_for("running at") == f"Latent Studio is running at {server.url}"
        )  # same port, same flags
        assert server.process.poll() is None and server.process.pid == pid  # the same process, re-executed
        after = statuses(server.url)
        assert after["plugins/drop.py"] == "disabled"
        assert after["plugins/keep.py"] == "loaded"
        assert after["latent-studio-example-plugin:example"] == "loaded"
        offered = choices_anywhere(server.url)
        assert {"Euler Trailing", "DDIM keep"} <= offered and "DDIM drop" not in offered
    finally:
        server.close()


def test_a_server_others_can_reach_has_no_route_that_changes_plugins(tmp_path):
    from webui.ui.server import LOCALHOST

    server = Server(tmp_path / "outputs", "--listen", "--auth", "ada:lovelace")
    try:
        assert server.demo.server_name != LOCALHOST
        api_names = {fn.api_name for fn in server.demo.fns.values()}
        assert not api_names & set(MANAGING)
        ids = {
            block.elem_id: block for block in server.demo.blocks.values() if getattr(block, "elem_id", None)
        }
        for control in (
            "plugins-enable",
            "plugins-disable",
            "plugins-check",
            "plugins-install",
            "plugins-restart",
            "plugins-spec",
            "plugins-wheel",
            "plugins-choice",
        ):
            assert ids[control].interactive is False, control
        assert "this server was started with --listen" in ids["plugins-locked"].value
        assert "--enable-plugin-install" in ids["plugins-locked"].value
        assert "runs inside Latent Studio with the app's rights" in ids["plugins-trust"].value
        endpoints = server.client(auth=("ada", "lovelace")).view_api(return_format="dict", print_info=False)
        assert not {name.strip("/") for name in endpoints["named_endpoints"]} & set(MANAGING)
        assert "txt2img" in {name.strip("/") for name in endpoints["named_endpoints"]}
    finally:
        server.close()


def test_enable_plugin_install_opens_the_routes_and_an_embedded_server_cannot_restart(tmp_path, monkeypatch):
    from webui.cli import build_parser
    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager
    from webui.ui.app import build_app
    from webui.ui.server import PluginControl, plugin_control_problem
    from webui.ui.service import StudioService

    monkeypatch.setenv("LATENT_STUDIO_HOME", str(tmp_path / "home"))
    args = build_parser().parse_args(["--listen", "--auth", "a:b", "--enable-plugin-install"])
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    for restart, expected in ((lambda: None, set(MANAGING)), (None, set(MANAGING) - {"plugins_restart"})):
        service = StudioService(engine, tmp_path / "outputs")
        service.plugin_control = PluginControl(plugin_control_problem(args), restart)
        demo = build_app(service)
        assert {fn.api_name for fn in demo.fns.values()} & set(MANAGING) == expected
    ids = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert ids["plugins-restart"].interactive is False
    assert ids["plugins-locked"].value.startswith(
        "This server runs inside another program and cannot restart"
    )
    assert "plugins-mode" not in ids
    assert os.environ.get("LATENT_STUDIO_SAFE_MODE") is None

    safe = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[], safe_mode=True))
    demo = build_app(StudioService(safe, tmp_path / "outputs"))
    ids = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert ids["plugins-mode"].value.startswith("**Safe mode:** only the built-in plugins are loaded")
    assert (
        ids["plugins-locked"].value == "🔒 Plugins can be managed here only in a server started by launch.py."
    )
    assert not {fn.api_name for fn in demo.fns.values()} & set(MANAGING)
