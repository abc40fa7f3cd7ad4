"""The "Sketch to image" tab, which Latent Studio builds from the plugin's task and fields (the
plugin itself has no gradio code): built in-process, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from latent_studio_sketch import plugin
from PIL import Image

from webui.testing import (
    build_ui,
    make_engine,
    run_task,
    save_controlnet,
    tiny_bundle,
    tiny_controlnet,
    ui_components,
    ui_request,
)

gr = pytest.importorskip("gradio")

EDGES = "tiny-edges"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save_controlnet(tiny_controlnet(seed=7), models, EDGES)
    return make_engine(plugin, bundle=tiny_bundle(), models_dir=str(models))


@pytest.fixture(scope="module")
def demo(engine, tmp_path_factory):
    return build_ui(engine, tmp_path_factory.mktemp("outputs"))


def test_the_tab_is_registered_after_seg2img(engine, demo):
    tabs = [block.elem_id for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs[:5] == ["tab-txt2img", "tab-img2img", "tab-inpaint", "tab-seg2img", "tab-sketch2img"]
    assert ui_components(demo)["tab-sketch2img"].label == "Sketch to image"
    assert all(record.error is None for record in engine.plugins.records.values())


def test_the_tab_has_a_control_for_every_field(demo):
    found = ui_components(demo)
    assert "Sketch to image" in [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert isinstance(found["sketch2img-sketch"], gr.ImageEditor)
    assert isinstance(found["sketch2img-sketch-photo"], gr.Image)
    controlnet = found["sketch2img-sketch-controlnet"]
    assert isinstance(controlnet, gr.Dropdown) and EDGES in [value for _, value in controlnet.choices]
    assert isinstance(found["sketch2img-sketch-invert"], gr.Radio)
    weight = found["sketch2img-sketch-weight"]
    assert isinstance(weight, gr.Slider) and (weight.minimum, weight.maximum, weight.value) == (0, 2, 1)
    low = found["sketch2img-sketch-low-threshold"]
    assert (low.minimum, low.maximum, low.value) == (1, 255, 100)
    for name in ("sketch-high-threshold", "sketch-start", "sketch-end", "prompt", "generate"):
        assert f"sketch2img-{name}" in found
    assert not [elem for elem in found if elem.startswith(("txt2img-sketch", "seg2img-sketch"))]
    assert "pnginfo-send-sketch2img" in found  # PNG Info can send a sketch2img infotext to the tab


def test_a_drawing_on_the_canvas_makes_the_same_request_as_the_api(engine):
    canvas = np.full((64, 64, 3), 255, dtype=np.uint8)
    canvas[20:22, 10:54] = canvas[10:54, 30:32] = 0
    values = {
        "prompt": "a red cat",
        "steps": 2,
        "seed": 1,
        "width": 64,
        "height": 64,
        "sampler": "Euler",
        "sketch": {
            "background": Image.new("RGB", (64, 64), "white"),
            "layers": [],
            "composite": Image.fromarray(canvas),
        },
        "sketch_photo": None,
        "sketch_controlnet": EDGES,
        "sketch_weight": 0.8,
        "sketch_invert": "auto",
    }
    request = ui_request(engine, "sketch2img", values)
    assert request.task == "sketch2img" and request.extra["sketch_weight"] == 0.8
    from_ui = engine.generate(request)
    from_api = run_task(
        engine,
        "sketch2img",
        prompt="a red cat",
        extra={"sketch": Image.fromarray(canvas), "sketch_controlnet": EDGES, "sketch_weight": 0.8},
    )
    assert np.array_equal(np.asarray(from_ui.images[0].image), np.asarray(from_api.images[0].image))
    assert from_ui.infotexts == from_api.infotexts
