"""Outpainting (webui/builtin/outpaint.py): the canvas, the mask, the fill, the original pixels kept
byte for byte, 9- and 4-channel models, the limits, the infotext and PNG Info, the command line."""

from __future__ import annotations

import numpy as np
import pytest
from components import bundle_from, sd_components
from fixtures_models import random_image, rect_mask
from PIL import Image

from webui.builtin import outpaint
from webui.errors import InvalidRequestError
from webui.limits import LimitExceeded, Limits
from webui.metadata import parse_infotext
from webui.request import GenerationRequest

BASE = dict(prompt="a green triangle", steps=2, seed=7, sampler="Euler a")


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory):
    """A tiny inpainting model (a 9-channel UNet), built as tests/test_engine.py builds it."""
    return bundle_from(sd_components(tmp_path_factory.mktemp("tok9"), in_channels=9))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def outpainted(engine, model, *, task="inpaint", sides=None, **kwargs):
    extra = {f"outpaint_{side}": value for side, value in (sides or {}).items()}
    request = GenerationRequest(**{**BASE, "task": task, "strength": 1.0, **kwargs}, extra=extra)
    return engine.generate(request, bundle=model)


# -- the pieces ---------------------------------------------------------------------------------


def test_amounts_round_up_to_multiples_of_eight_and_fix_odd_image_sides():
    assert outpaint.plan((64, 64), {"left": 1, "up": 30}) == {"left": 8, "right": 0, "up": 32, "down": 0}
    # a 61-pixel-wide image extended upwards only: 3 columns more on the right make 64
    assert outpaint.plan((61, 64), {"up": 8}) == {"left": 0, "right": 3, "up": 8, "down": 0}
    # extended on the left only: the rest goes to the left
    assert outpaint.plan((61, 64), {"left": 8}) == {"left": 11, "right": 0, "up": 0, "down": 0}


def test_new_area_mask_reaches_the_overlap_into_the_image():
    mask = np.asarray(
        outpaint.new_area_mask((32, 32), {"left": 16, "right": 0, "up": 0, "down": 8}, overlap=4)
    )
    assert mask.shape == (40, 48)
    assert (mask[:, :20] == 255).all()  # 16 new columns and 4 into the image
    assert (mask[28:, :] == 255).all()  # 8 new rows and 4 into the image
    assert (mask[:28, 20:] == 0).all()  # the rest of the image is kept


def test_extend_keeps_the_image_and_fills_from_its_edges():
    image = Image.new("RGB", (16, 16), (200, 30, 10))
    canvas = outpaint.extend(image, {"left": 8, "right": 8, "up": 0, "down": 16})
    out = arr(canvas)
    assert canvas.size == (32, 32)
    assert (out[:16, 8:24] == (200, 30, 10)).all()
    assert np.abs(out - (200, 30, 10)).max() <= 1  # a plain image's edges stretch to the same colour


def test_infotext_entry_round_trips():
    assert outpaint.format_infotext({"left": 64, "right": 0, "up": 32, "down": 0}) == "left 64, up 32"
    assert outpaint.parse_infotext("left 64, up 32") == {"left": 64, "up": 32}
    assert outpaint.parse_infotext("left many, sideways 3, down 8") == {"down": 8}


# -- generations --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bundle", "inpaint_bundle"])
def test_outpainting_extends_the_canvas_and_keeps_the_original_exactly(engine, request, which):
    model = request.getfixturevalue(which)
    init = random_image(3, size=32)
    mask = Image.new("L", init.size, 0)
    result = outpainted(engine, model, init_image=init, mask=mask, sides={"left": 16, "down": 8}, mask_blur=2)
    image = result.images[0].image
    assert image.size == (48, 40)
    out, original = arr(image), arr(init)
    # outside the seam (the 2-pixel overlap softened by a blur of 2) the pixels are the original's
    seam = 2 + 3 * 2
    assert np.array_equal(out[: 32 - seam, 16 + seam :], original[: 32 - seam, seam:])
    new = np.concatenate([out[:, :16].reshape(-1, 3), out[32:, :].reshape(-1, 3)])
    assert new.std() > 1  # the new area was generated, not left flat
    assert 'Outpaint: "left 16, down 8"' in result.infotexts[0]  # quoted: it holds a comma
    assert parse_infotext(result.infotexts[0])["Outpaint"] == "left 16, down 8"
    assert "Size: 48x40" in result.infotexts[0]


def test_outpainting_in_img2img_without_a_mask_and_with_mask_blur_zero(engine, bundle):
    init = random_image(4, size=32)
    result = outpainted(engine, bundle, task="img2img", init_image=init, sides={"right": 8}, mask_blur=0)
    out = arr(result.images[0].image)
    assert out.shape == (32, 40, 3)
    assert np.array_equal(out[:, :32], arr(init))  # no seam: every original pixel is kept


def test_a_user_mask_is_added_to_the_new_area(engine, inpaint_bundle):
    init = random_image(5, size=32)
    mask = rect_mask(32)
    result = outpainted(engine, inpaint_bundle, init_image=init, mask=mask, sides={"up": 8}, mask_blur=0)
    out, original = arr(result.images[0].image), arr(init)
    assert out.shape == (40, 32, 3)
    inside = np.asarray(mask) > 0
    kept = out[8:][~inside]
    assert np.array_equal(kept, original[~inside])
    assert np.abs(out[8:][inside] - original[inside]).mean() > 5  # the painted area was repainted


@pytest.mark.parametrize("mode", ["fill", "original", "latent noise", "latent nothing"])
def test_every_masked_content_mode_outpaints(engine, bundle, mode):
    init = random_image(6, size=32)
    result = outpainted(
        engine,
        bundle,
        init_image=init,
        mask=Image.new("L", init.size, 0),
        sides={"right": 16},
        masked_content=mode,
        mask_blur=0,
        strength=0.6,
    )
    out = arr(result.images[0].image)
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out[:, :32], arr(init))


def test_a_huge_outpaint_is_refused_before_any_work(engine, bundle):
    engine.limits = Limits(max_pixels=512 * 512)
    with pytest.raises(LimitExceeded, match="over this server's limit"):
        outpainted(
            engine,
            bundle,
            task="img2img",
            init_image=random_image(1, size=32),
            sides={"right": 1000, "down": 1000},
        )
    engine.limits = Limits()
    with pytest.raises(InvalidRequestError, match="at most 8192"):
        outpainted(engine, bundle, task="img2img", init_image=random_image(1, size=32), sides={"right": 8192})


def test_bad_amounts_and_a_missing_image_are_refused(engine, bundle):
    with pytest.raises(InvalidRequestError, match="outpaint_left must be between 0 and 8192"):
        outpainted(engine, bundle, task="img2img", init_image=random_image(1, size=32), sides={"left": -8})
    with pytest.raises(InvalidRequestError, match="outpainting needs an image"):
        outpainted(engine, bundle, task="txt2img", sides={"up": 8}, width=32, height=32)


def test_png_info_reads_the_amounts_back(engine):
    parsed = parse_infotext('a cat\nSteps: 2, Sampler: Euler a, Size: 48x40, Outpaint: "left 16, down 8"')
    values, notes = engine.fields.from_infotext(parsed, task="inpaint")
    assert notes == []
    assert values["outpaint_left"] == 16 and values["outpaint_down"] == 8
    assert "outpaint_up" not in values and "outpaint_right" not in values


def test_command_line_flags_come_from_the_fields(engine):
    from webui.cli import build_parser, field_values

    args = build_parser(engine.fields).parse_args(
        ["generate", "--outpaint-left", "24", "--outpaint-down", "8"]
    )
    values = field_values(args, engine.fields)
    assert values == {"outpaint_left": 24, "outpaint_down": 8}


def test_a1111_img2img_bodies_take_the_outpaint_keys(engine, bundle):
    from webui.http.a1111 import encode_png, parse_body

    init = random_image(9, size=32)
    body = {"prompt": "x", "init_images": [encode_png(init)], "outpaint_left": 8, "outpaint_up": 8}
    parsed = parse_body(body, "img2img", engine, {})
    assert parsed.request.task == "img2img"
    assert parsed.request.extra["outpaint_left"] == 8 and parsed.request.extra["outpaint_up"] == 8
    with pytest.raises(InvalidRequestError, match="outpaint_up must be a whole number"):
        parse_body({**body, "outpaint_up": "lots"}, "img2img", engine, {})


# -- the web app and the HTTP API (a real server on the shipped 64-pixel model) ---------------------

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_http_api_outpaints_through_img2img(server):
    import base64
    import io
    import json

    import httpx

    from webui.http.a1111 import encode_png

    init = random_image(11, size=64)
    body = {
        "prompt": "a gray background",
        "init_images": [encode_png(init)],
        "outpaint_right": 32,
        "outpaint_down": 16,
        "mask_blur": 0,
        "denoising_strength": 1.0,
        "steps": 2,
        "seed": 3,
    }
    with httpx.Client(base_url=server.url, timeout=120) as api:
        answer = api.post("/sdapi/v1/img2img", json=body)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert image.size == (96, 80)
        assert np.array_equal(arr(image)[:64, :64], arr(init))
        infotext = json.loads(answer.json()["info"])["infotexts"][0]
        assert parse_infotext(infotext)["Outpaint"] == "right 32, down 16"
        refused = api.post("/sdapi/v1/img2img", json={**body, "outpaint_left": -1})
        assert refused.status_code == 422
        assert refused.json()["detail"] == "outpaint_left must be between 0 and 8192, got -1"


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_outpaint_in_the_inpainting_tab_without_painting(browser, server, tmp_path):
    import datetime

    from training import shapes

    init, _ = shapes.Scene("circle", "red", "large", "center", "blue").render()
    init.save(tmp_path / "init.png")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url)
        page.locator("#txt2img-prompt textarea").wait_for(timeout=WAIT_MS)
        page.get_by_role("tab", name="Inpainting").click()
        page.locator("#inpaint-prompt textarea").fill("a large red circle on a blue background")
        page.locator("#inpaint-editor input[type=file]").first.set_input_files(str(tmp_path / "init.png"))
        page.locator("#inpaint-editor canvas").first.wait_for(timeout=WAIT_MS)
        page.locator("#inpaint-outpainting").get_by_text("Outpainting").first.click()
        number = page.locator("#inpaint-outpaint-left input[type=number]")
        number.fill("32")
        number.press("Enter")
        page.wait_for_timeout(500)
        page.locator("#inpaint-generate").click()
        page.locator("#inpaint-gallery img").first.wait_for(timeout=WAIT_MS)
        day = server.outputs / "inpaint" / datetime.date.today().strftime("%Y-%m-%d")
        out = Image.open(sorted(day.glob("*.png"))[-1])
        assert out.size == (96, 64)
        # the default mask blur of 4: a 4-pixel overlap, softened; beyond it, the upload's own pixels
        assert np.array_equal(arr(out)[:, 32 + 16 :], arr(init)[:, 16:])
        assert "Outpaint: left 32" in page.locator("#inpaint-infotext textarea").input_value()
        from ui_server import ROOT

        (ROOT / "test-artifacts" / "screenshots").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ROOT / "test-artifacts" / "screenshots" / "outpaint.png"), full_page=True)
    finally:
        page.close()
