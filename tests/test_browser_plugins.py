"""The Plugins tab in a real headless Chromium: the list with its trust notice, disabling a
plugin, and the managing controls disabled (with the reason) on a server that listens on the
network behind a login. Same browser set-up as ``test_browser.py``; a screenshot goes to
``test-artifacts/screenshots/plugins.png``."""

from __future__ import annotations

import json

import pytest
from test_browser import WAIT_MS, shot
from ui_server import Server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]  # the browser fixture is in conftest.py

STYLES = """
from webui.api import hookimpl
__version__ = "1.4"
LATENT_STUDIO_API = 1

@hookimpl
def write_metadata(parameters, image, request, context):
    parameters["Styles plugin"] = "on"
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def open_plugins_tab(page) -> None:
    page.get_by_role("tab", name="Plugins").click()
    page.locator("#plugins-table").wait_for(timeout=WAIT_MS)


def table_text(page) -> str:
    return page.locator("#plugins-table").inner_text()


def test_the_tab_lists_plugins_and_disables_one(browser, home, tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "styles.py").write_text(STYLES)
    server = Server(tmp_path / "outputs", plugin_dirs=[folder])
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(server.url)
        open_plugins_tab(page)
        assert (
            "runs inside Latent Studio with the app's rights" in page.locator("#plugins-trust").inner_text()
        )
        text = table_text(page)
        assert "plugins/styles.py" in text and "webui.builtin.text" in text
        assert "write_metadata" in text and "1.4" in text
        assert page.locator("#plugins-install").is_disabled()  # nothing checked yet
        assert page.locator("#plugins-check").is_enabled() and page.locator("#plugins-restart").is_disabled()

        page.locator("#plugins-choice input").click()
        page.get_by_role("option", name="plugins/styles.py").click()
        page.locator("#plugins-disable").click()
        page.wait_for_function(
            "() => document.querySelector('#plugins-message textarea')?.value.startsWith('disabled plugins/styles.py')",
            timeout=WAIT_MS,
        )
        page.wait_for_function(
            "() => document.querySelector('#plugins-table').textContent"
            ".includes('loaded; disabled from the next start')",
            timeout=WAIT_MS,
        )
        assert json.loads((home / "plugins.json").read_text()) == {"disabled": ["plugins/styles.py"]}
        assert "Traceback" not in page.content()
        shot(page, "plugins")
    finally:
        page.close()
        server.close()


def test_behind_a_login_on_the_network_the_controls_are_off_and_say_why(browser, home, tmp_path):
    server = Server(tmp_path / "outputs", "--listen", "--auth", "ada:lovelace")
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(server.url)
        page.locator("input[type=password]").wait_for(timeout=WAIT_MS)
        page.locator("input:not([type=password])").first.fill("ada")
        page.locator("input[type=password]").fill("lovelace")
        page.keyboard.press("Enter")
        page.locator("#txt2img-prompt textarea").wait_for(timeout=WAIT_MS)
        open_plugins_tab(page)
        assert "webui.builtin.text" in table_text(page)
        for control in (
            "#plugins-enable",
            "#plugins-disable",
            "#plugins-check",
            "#plugins-install",
            "#plugins-restart",
        ):
            assert page.locator(control).is_disabled(), control
        assert page.locator("#plugins-wheel input[type=file]").count() == 0  # no upload box
        locked = page.locator("#plugins-locked").inner_text()
        assert "this server was started with --listen" in locked and "--enable-plugin-install" in locked
        assert not home.exists()  # nothing was written
    finally:
        page.close()
        server.close()
