"""The web UI derived from the field registry: a plugin's field gets a control on exactly the tabs of
its tasks, its value reaches the request, the infotext and PNG Info's "Send to"; a plugin's task gets
a tab without any gradio code; tabs of one task never share element ids or endpoints.

One real server (the shipped shapes model) with plugins registered in code, called through
gradio_client and its /config; ``build_request`` is also tested alone.
"""

from __future__ import annotations

import datetime
from collections import Counter

import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from ui_server import Server, call, call_named

from webui.api import hookimpl
from webui.errors import InvalidRequestError
from webui.fields import FieldRegistry
from webui.metadata import parse_infotext, read_png_parameters

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAST = {"Steps": 2, "Seed (-1 = random)": 3}


class Detail:
    """A community plugin's field, for txt2img and img2img only, recorded in the infotext."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    @hookimpl
    def register_fields(self, register):
        register(
            "detail",
            "float",
            default=0.0,
            minimum=0.0,
            maximum=2.0,
            step=0.1,
            tasks=("txt2img", "img2img"),
            label="Detail",
            help="how much detail to add",
            infotext="Detail",
        )

    @hookimpl
    def prepare_request(self, request, context):
        self.seen.append((request.task, request.extra.get("detail")))


class Sketch:
    """A community plugin's task with a drawing-canvas field, and its tab (no gradio code)."""

    def __init__(self) -> None:
        self.sketches: list[Image.Image] = []

    @hookimpl
    def register_tasks(self, register):
        register("sketch2img", "Sketch to image", requires=("sketch",), message="sketch2img needs a sketch")

    @hookimpl
    def register_fields(self, register):
        register("sketch", "image", widget="sketch", tasks=("sketch2img",), label="Sketch", group="sketch")

    @hookimpl
    def prepare_request(self, request, context):
        if request.task == "sketch2img":
            self.sketches.append(request.extra["sketch"])

    @hookimpl
    def register_ui_tabs(self, register):
        register("sketch", "Sketch to image", task="sketch2img", order=50)


class MoreTabs:
    """A second text-to-image tab, built by the plugin after PNG Info, and a tab with a bad id."""

    @hookimpl
    def register_ui_tabs(self, register):
        def build(ui):
            from webui.ui.controls import generation_tab

            generation_tab(ui, "txt2img")

        register("mytab", "My text to image", build, order=95)
        register("Bad Tab", "Badly named", task="txt2img", order=96)


@pytest.fixture(scope="module")
def plugins():
    return {"detail": Detail(), "sketch": Sketch(), "tabs": MoreTabs()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, plugins):
    server = Server(tmp_path_factory.mktemp("outputs"), plugins=list(plugins.values()))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def config(server):
    return httpx.get(server.url + "config", timeout=60).json()


def elem_ids(config: dict) -> list[str]:
    return [c["props"]["elem_id"] for c in config["components"] if c["props"].get("elem_id")]


def endpoint(config: dict, api_name: str) -> dict:
    return next(d for d in config["dependencies"] if d.get("api_name") == api_name)


def ids_of(config: dict, component_ids: list[int]) -> list[str | None]:
    by_id = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    return [by_id[i] for i in component_ids]


def inside(config: dict, container: str) -> set[str]:
    """The element ids of everything under the layout block with element id ``container``."""
    by_id = {c["id"]: c["props"].get("elem_id") for c in config["components"]}

    def find(node: dict) -> dict | None:
        if by_id.get(node["id"]) == container:
            return node
        return next((hit for child in node.get("children", []) if (hit := find(child))), None)

    def below(node: dict) -> set[str]:
        found = {by_id[node["id"]]} if by_id.get(node["id"]) else set()
        for child in node.get("children", []):
            found |= below(child)
        return found

    node = find(config["layout"])
    assert node is not None, container
    return below(node) - {container}


def test_a_plugin_field_shows_on_exactly_the_tabs_of_its_tasks(config):
    ids = set(elem_ids(config))
    assert {
        tab
        for tab in ("txt2img", "img2img", "inpaint", "seg2img", "sketch", "mytab")
        if f"{tab}-detail" in ids
    } == {"txt2img", "img2img", "mytab"}
    # in the closed "More options" accordion (plugin fields' default group), with its help text
    assert "txt2img-detail" in inside(config, "txt2img-more")
    detail = next(c for c in config["components"] if c["props"].get("elem_id") == "txt2img-detail")
    assert detail["type"] == "slider" and (detail["props"]["minimum"], detail["props"]["maximum"]) == (0, 2)
    assert detail["props"]["info"] == "how much detail to add"
    # the built-in CFG rescale (group "sampling") sits next to the CFG scale on every generation tab
    assert all(f"{tab}-cfg-rescale" in ids for tab in ("txt2img", "img2img", "inpaint", "seg2img", "sketch"))
    assert "txt2img-cfg-rescale" not in inside(config, "txt2img-more")


def test_a_plugin_field_reaches_the_request_the_infotext_and_png_info(server, client, plugins):
    seen = plugins["detail"].seen
    infotext = call(client, "txt2img", Prompt="a red circle", Detail=0.7, **{"CFG rescale": 0.5}, **FAST)[3]
    assert seen[-1] == ("txt2img", 0.7)
    parsed = parse_infotext(infotext)
    assert parsed["Detail"] == "0.7" and parsed["CFG rescale"] == "0.5"
    day = server.outputs / "txt2img" / datetime.date.today().isoformat()
    assert read_png_parameters(sorted(day.glob("*-3.png"))[-1]) == infotext
    sent = call_named(client, "pnginfo_to_img2img", infotext)
    assert sent["Detail"] == 0.7 and sent["CFG rescale"] == 0.5 and sent["Prompt"] == "a red circle"
    # the default is not written, and PNG Info leaves the control as it is
    infotext = call(client, "txt2img", Prompt="a red circle", **FAST)[3]
    assert seen[-1] == ("txt2img", 0.0) and "Detail" not in parse_infotext(infotext)
    assert call_named(client, "pnginfo_to_txt2img", infotext)["Detail"] == {"__type__": "update"}


def test_a_bad_value_gives_one_line_and_the_server_keeps_serving(client):
    cases = [
        ({"Detail": 5}, "Detail must be between 0 and 2, got 5"),
        ({"Steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"Steps": 10_000}, "Steps 10000 is over this server's limit of 150 (--max-steps)"),
    ]
    for values, message in cases:
        with pytest.raises(AppError) as error:
            call(client, "txt2img", **{"Prompt": "x", **FAST, **values})
        assert str(error.value) == message
    assert call(client, "txt2img", Prompt="a red circle", **FAST)[0].startswith("1 image(s)")


def test_a_tab_reusing_a_task_has_its_own_ids_endpoints_and_send_to(server, client, config):
    ids = elem_ids(config)
    assert not [name for name, count in Counter(ids).items() if count > 1]  # every element id once
    assert {"mytab-prompt", "mytab-generate", "mytab-seed"} <= set(ids)
    # PNG Info has a button for it although the tab comes after PNG Info
    assert {"pnginfo-send-txt2img", "pnginfo-send-mytab", "pnginfo-send-sketch"} <= inside(
        config, "tab-pnginfo"
    )
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"txt2img", "mytab", "mytab_interrupt", "mytab_skip", "pnginfo_to_mytab"} <= names
    assert not {name for name in names if name and name.startswith(("txt2img_1", "mytab_1"))}
    # each "Send to" fills its own tab's controls (the first two outputs: the tab selector, the notes)
    for tab in ("txt2img", "mytab"):
        targets = ids_of(config, endpoint(config, f"pnginfo_to_{tab}")["outputs"])[2:]
        assert targets and all(target.startswith(f"{tab}-") for target in targets), targets
        assert {f"{tab}-prompt", f"{tab}-vae", f"{tab}-detail", f"{tab}-cfg-rescale"} <= set(targets)
    infotext = call(client, "mytab", Prompt="a blue square", **FAST)[3]
    assert parse_infotext(infotext)["Seed"] == "3"
    assert sorted((server.outputs / "txt2img" / datetime.date.today().isoformat()).glob("*-3.png"))
    assert call_named(client, "pnginfo_to_mytab", infotext)["Prompt"] == "a blue square"


def test_a_plugin_task_gets_a_tab_and_runs(server, client, config, plugins, tmp_path):
    ids = set(elem_ids(config))
    assert {"tab-sketch", "sketch-sketch", "sketch-prompt", "sketch-generate", "pnginfo-send-sketch"} <= ids
    canvas = next(c for c in config["components"] if c["props"].get("elem_id") == "sketch-sketch")
    assert canvas["type"] == "imageeditor"
    drawing = Image.new("RGB", (64, 64), "white")
    drawing.paste((0, 0, 0), (16, 16, 48, 48))
    drawing.save(tmp_path / "drawing.png")
    editor = {
        "background": handle_file(str(tmp_path / "drawing.png")),
        "layers": [],
        "composite": handle_file(str(tmp_path / "drawing.png")),
        "id": None,
    }
    progress = call(client, "sketch", Prompt="a red circle", Sketch=editor, **FAST)[0]
    assert progress.startswith("1 image(s)")
    got = np.asarray(plugins["sketch"].sketches[-1].convert("RGB"))
    assert got.shape == (64, 64, 3) and (got[16:48, 16:48] == 0).all() and (got[:16] == 255).all()
    assert list((server.outputs / "sketch2img").rglob("*-3.png"))  # the task names the outputs folder
    with pytest.raises(AppError, match="^draw or upload a sketch first$"):
        call(client, "sketch", Prompt="x", Sketch=None, **FAST)


def test_a_tab_with_a_bad_id_is_refused_and_says_so(config, client):
    tabs = [c["props"]["label"] for c in config["components"] if c["type"] == "tabitem"]
    assert "Badly named" in tabs
    notes = [str(c["props"].get("value")) for c in config["components"] if c["type"] == "markdown"]
    assert any(note.startswith("**This tab was not loaded:** its id") for note in notes)
    assert not [i for i in elem_ids(config) if i.lower().startswith("bad")]
    assert call(client, "txt2img", Prompt="a red circle", **FAST)[0].startswith("1 image(s)")


def test_build_request_checks_each_value_through_its_field():
    from webui.ui.controls import build_request

    registry = FieldRegistry.builtin()
    registry.add("detail", "float", default=0.0, minimum=0.0, maximum=2.0, tasks=("txt2img",))
    request = build_request(
        "txt2img",
        {
            "prompt": "a cat",
            "steps": 12.0,
            "vae": "Automatic",
            "model": "",
            "seed": None,
            "cfg_scale": 6.5,
            "detail": 1.5,
            "widget": "ignored",
            "strength": 0.3,
        },
        fields=registry,
    )
    assert (request.prompt, request.steps, request.vae, request.model, request.seed) == (
        "a cat",
        12,
        None,
        None,
        -1,
    )
    assert isinstance(request.steps, int) and request.cfg_scale == 6.5
    assert request.extra == {"detail": 1.5}  # "widget" is no field; strength is not a txt2img field
    assert request.strength == 0.75
    with pytest.raises(InvalidRequestError, match="^detail must be between 0 and 2, got 3$"):
        build_request("txt2img", {"detail": 3.0}, fields=registry)
    with pytest.raises(InvalidRequestError, match="^upload an init image first$"):
        build_request("img2img", {"init_image": None}, fields=registry)
    with pytest.raises(InvalidRequestError, match="^unknown task 'sketch2img'"):
        build_request("sketch2img", {}, fields=registry)
    # a tab's own widgets become fields through its extras
    request = build_request(
        "img2img", {"picture": "x"}, lambda values: {"init_image": Image.new("RGB", (8, 8))}, fields=registry
    )
    assert request.init_image.size == (8, 8)
