"""The HTTP API end to end: a real server (web app + ``--api``) started by the test, driven with
plain HTTP. AUTOMATIC1111's routes, OpenAI's images route, logins, hostile input, and the same seed
giving the same pixels through the web app, the command line and the API."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from argparse import Namespace

import httpx
import numpy as np
import pytest
from PIL import Image
from ui_server import MODELS, ROOT, Server, call

from webui.metadata import parse_infotext, read_png_parameters

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ALICE = ("alice", "wonderland")
BOB = ("bob", "builder99")
QUICK = {"steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("outputs"),
        "--api",
        "--api-auth",
        f"{ALICE[0]}:{ALICE[1]},{BOB[0]}:{BOB[1]}",
        "--max-upload-mb",
        "1",
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, auth=ALICE, timeout=120) as client:
        yield client


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and "Traceback" not in detail
    return detail


# -- logins ----------------------------------------------------------------------------------


def test_login_refused_without_or_with_a_wrong_password_and_accepted_with_the_right_one(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        response = anonymous.get("/sdapi/v1/sd-models")
        assert "needs a login" in one_line_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Basic")
        assert anonymous.get("/docs").status_code == 401  # the API's description too
        assert anonymous.get("/openapi.json").status_code == 401
        assert "wrong" in one_line_error(anonymous.get("/sdapi/v1/sd-models", auth=("alice", "nope")), 401)
        assert anonymous.get("/", follow_redirects=True).status_code == 200  # the web app has no --auth here
        ok = anonymous.get("/sdapi/v1/sd-models", auth=ALICE)
        assert ok.status_code == 200 and ok.json()[0]["model_name"] == "latent-studio-shapes"
        docs = anonymous.get("/docs", auth=BOB)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        spec = anonymous.get("/openapi.json", auth=BOB).json()
        assert {"/sdapi/v1/txt2img", "/api/v1/jobs/{job_id}/events", "/v1/images/generations"} <= set(
            spec["paths"]
        )


def test_api_settings_follow_the_exposure_rules(tmp_path):
    from webui.http.auth import api_settings
    from webui.ui.server import LaunchRefused

    def args(**given):
        base = dict(
            api=True,
            nowebui=False,
            api_auth=None,
            api_auth_file=None,
            api_key=None,
            api_key_file=None,
            listen=False,
            share=False,
            insecure=False,
        )
        return Namespace(**{**base, **given})

    assert not api_settings(args(), []).protected  # 127.0.0.1 for its owner: open
    with pytest.raises(LaunchRefused, match="--listen would let anyone"):
        api_settings(args(listen=True), [])
    assert api_settings(args(listen=True, insecure=True), []).enabled
    same = api_settings(args(listen=True), [("web", "secret")])  # only --auth: the API uses the same users
    assert same.logins == (("web", "secret"),)
    own = api_settings(args(listen=True, api_auth="api:other"), [("web", "secret")])
    assert own.logins == (("api", "other"),)
    keyed = api_settings(args(nowebui=True, listen=True, api_key="k" * 20), [])
    assert keyed.protected and not keyed.web and keyed.login_stand_ins()
    with pytest.raises(LaunchRefused, match="--share"):
        api_settings(args(nowebui=True, share=True, api_key="k" * 20), [])
    with pytest.raises(LaunchRefused, match="need --api"):
        api_settings(args(api=False, api_auth="a:b"), [])
    with pytest.raises(LaunchRefused, match="USER:PASS"):
        api_settings(args(api_auth="nopassword"), [])
    with pytest.raises(LaunchRefused, match="at least 8"):
        api_settings(args(api_key="short"), [])


# -- AUTOMATIC1111's routes ------------------------------------------------------------------------


def test_txt2img_answers_as_a1111(api):
    body = {
        "prompt": "a large red circle in the center on a blue background",
        "negative_prompt": "green",
        "batch_size": 2,
        **QUICK,
    }
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["parameters"] == body
    info = json.loads(answer["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert (info["width"], info["height"], info["steps"], info["sampler_name"]) == (64, 64, 2, "Euler a")
    assert info["prompt"] == body["prompt"] and info["negative_prompt"] == "green"
    assert isinstance(info["cfg_scale"], (int, float)) and info["sd_model_name"] == "latent-studio-shapes"
    assert len(answer["images"]) == 2 and len(info["infotexts"]) == 2
    for text, infotext, seed in zip(answer["images"], info["infotexts"], (7, 8), strict=True):
        image = decoded(text)
        assert image.size == (64, 64)
        assert read_png_parameters(image) == infotext  # the parameters chunk
        assert parse_infotext(infotext)["Seed"] == str(seed)


def test_override_settings_apply_to_one_request_and_options_are_per_user(api, server):
    once = api.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a square",
            **QUICK,
            "override_settings": {
                "CLIP_stop_at_last_layers": 2,
                "sd_model_checkpoint": "latent-studio-shapes",
            },
        },
    )
    assert json.loads(once.json()["info"])["clip_skip"] == 2
    after = api.post("/sdapi/v1/txt2img", json={"prompt": "a square", **QUICK})
    assert json.loads(after.json()["info"])["clip_skip"] == 1
    options = api.get("/sdapi/v1/options").json()
    assert (
        options["sd_model_checkpoint"] == "latent-studio-shapes" and options["CLIP_stop_at_last_layers"] == 1
    )
    assert {"sd_vae", "samples_save", "outdir_samples"} <= set(options)
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 3
    with httpx.Client(base_url=server.url, auth=BOB, timeout=30) as bob:
        assert bob.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    ran = api.post("/sdapi/v1/txt2img", json={"prompt": "a square", **QUICK})
    assert json.loads(ran.json()["info"])["clip_skip"] == 3
    assert "unknown option 'sd_checkpoint_cache'" in one_line_error(
        api.post("/sdapi/v1/options", json={"sd_checkpoint_cache": 2}), 422
    )
    assert "--outputs-dir" in one_line_error(
        api.post("/sdapi/v1/options", json={"outdir_samples": "/tmp"}), 422
    )
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200


def test_save_images_writes_the_png_only_when_asked(api, server):
    before = set(server.outputs.rglob("*.png"))
    api.post("/sdapi/v1/txt2img", json={"prompt": "not saved", **QUICK})
    assert set(server.outputs.rglob("*.png")) == before  # A1111's API default: save_images false
    answer = api.post("/sdapi/v1/txt2img", json={"prompt": "saved", **QUICK, "save_images": True}).json()
    new = set(server.outputs.rglob("*.png")) - before
    assert len(new) == 1
    saved = new.pop()
    assert saved.read_bytes() == base64.b64decode(answer["images"][0])


def test_img2img_with_a_mask_inpaints_and_keeps_the_rest(api):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    body = {
        "prompt": "a blue square",
        **QUICK,
        "init_images": [png_b64(init)],
        "mask": png_b64(Image.fromarray(mask)),
        "mask_blur": 0,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
        "denoising_strength": 1.0,
        "include_init_images": True,
    }
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["images"]) == 2  # the result, then the init image (include_init_images)
    out = pixels(decoded(answer["images"][0]))
    keep = mask == 0
    assert np.array_equal(out[keep], pixels(init)[keep]) and not np.array_equal(
        out[~keep], pixels(init)[~keep]
    )
    assert np.array_equal(pixels(decoded(answer["images"][1])), pixels(init))
    assert answer["parameters"]["init_images"] is None and answer["parameters"]["mask"] is None
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 1


def test_img2img_without_a_mask_and_an_inverted_mask(api):
    init = Image.new("RGB", (64, 64), (30, 200, 30))
    plain = api.post(
        "/sdapi/v1/img2img",
        json={"prompt": "x", **QUICK, "steps": 4, "init_images": [png_b64(init)], "denoising_strength": 0.5},
    )
    assert plain.status_code == 200 and json.loads(plain.json()["info"])["denoising_strength"] == 0.5
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    inverted = api.post(
        "/sdapi/v1/img2img",
        json={
            "prompt": "x",
            **QUICK,
            "init_images": [png_b64(init)],
            "mask": png_b64(Image.fromarray(mask)),
            "mask_blur": 0,
            "inpainting_mask_invert": 1,
            "denoising_strength": 1.0,
        },
    )
    out = pixels(decoded(inverted.json()["images"][0]))
    assert np.array_equal(out[:, :32], pixels(init)[:, :32])  # the white half is kept when inverted


def test_controlnet_extension_body_drives_the_segmentation_controlnet(api):
    names = api.get("/controlnet/model_list").json()["model_list"]
    assert names == ["latent-studio-shapes/controlnet"]
    assert api.get("/controlnet/module_list").json() == {"module_list": ["none"]}
    segmap = Image.new("RGB", (64, 64), (120, 120, 120))
    segmap.paste((255, 0, 0), (8, 8, 40, 40))
    unit = {
        "image": png_b64(segmap),
        "model": names[0] + " [0123abcd]",
        "module": "none",
        "weight": 1.0,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "resize_mode": "Crop and Resize",
        "processor_res": 512,
    }
    with_control = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a circle", **QUICK, "alwayson_scripts": {"controlnet": {"args": [unit]}}},
    )
    assert with_control.status_code == 200, with_control.text
    without = api.post("/sdapi/v1/txt2img", json={"prompt": "a circle", **QUICK})
    assert not np.array_equal(
        pixels(decoded(with_control.json()["images"][0])), pixels(decoded(without.json()["images"][0]))
    )
    off = api.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a circle",
            **QUICK,
            "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": False}]}},
        },
    )
    assert np.array_equal(
        pixels(decoded(off.json()["images"][0])), pixels(decoded(without.json()["images"][0]))
    )
    refused = api.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a circle",
            **QUICK,
            "alwayson_scripts": {"controlnet": {"args": [{**unit, "module": "canny"}]}},
        },
    )
    assert "module" in one_line_error(refused, 422)


def test_plugin_fields_are_accepted_under_their_registered_names(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **QUICK, "cfg_rescale": 0.7})
    assert response.status_code == 200
    assert parse_infotext(json.loads(response.json()["info"])["infotexts"][0])["CFG rescale"] == "0.7"
    assert "cfg_rescale" in one_line_error(
        api.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_rescale": 5}), 422
    )
    assert "did you mean cfg_rescale" in one_line_error(
        api.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_rescal": 0.5}), 422
    )


def test_hires_fix_with_a1111_keys(api):
    defaults = {
        "enable_hr": False,
        "hr_scale": 2.0,
        "hr_upscaler": None,
        "hr_sampler_name": None,
        "hr_prompt": "",
    }
    plain = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **QUICK, **defaults, "denoising_strength": 0})
    assert plain.status_code == 200, plain.text  # what clients send with the hires fix off
    assert decoded(plain.json()["images"][0]).size == (64, 64)
    body = {
        "prompt": "x",
        **QUICK,
        **defaults,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent (nearest)",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.6,
    }
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = decoded(response.json()["images"][0])
    assert image.size == (96, 96)
    info = parse_infotext(read_png_parameters(image))
    assert (
        info["Hires upscale"] == "1.5" and info["Hires steps"] == "2" and info["Denoising strength"] == "0.6"
    )
    assert info["Size"] == "64x64"


def test_png_info_reads_the_parameters_chunk(api):
    made = api.post("/sdapi/v1/txt2img", json={"prompt": "read me back", **QUICK}).json()
    info = api.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + made["images"][0]}).json()
    assert info["info"] == json.loads(made["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "read me back" and info["parameters"]["Seed"] == "7"
    assert info["items"] == {"parameters": info["info"]}
    plain = api.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_lists_and_small_routes(api):
    samplers = api.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M Karras"} <= {item["name"] for item in samplers}
    assert "euler_a" in next(item for item in samplers if item["name"] == "Euler a")["aliases"]
    schedulers = api.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras"} <= {item["name"] for item in schedulers}
    models = api.get("/sdapi/v1/sd-models").json()
    assert models == [
        {
            "title": "latent-studio-shapes",
            "model_name": "latent-studio-shapes",
            "hash": None,
            "sha256": None,
            "filename": "latent-studio-shapes",
            "config": None,
        }
    ]
    assert api.get("/sdapi/v1/sd-vae").json() == []
    assert api.get("/sdapi/v1/loras").json() == []
    assert api.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    for route in ("refresh-checkpoints", "refresh-loras"):
        assert api.post(f"/sdapi/v1/{route}").status_code == 200
    flags = api.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["api_auth"] == "(set)" and "wonderland" not in json.dumps(flags)
    memory = api.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    idle = api.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert api.post("/sdapi/v1/interrupt").status_code == 200  # nothing running: nothing happens
    assert api.post("/sdapi/v1/skip").status_code == 200


# -- OpenAI ------------------------------------------------------------------------------------


def test_openai_images_generations(api, server):
    response = api.post(
        "/v1/images/generations",
        json={
            "prompt": "a green triangle",
            "n": 2,
            "size": "64x64",
            "response_format": "b64_json",
            "model": "dall-e-3",
            "seed": 7,
            "quality": "standard",
        },
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and data[0]["revised_prompt"] == "a green triangle"
    assert decoded(data[0]["b64_json"]).size == (64, 64)
    assert "b64_json" in one_line_error(
        api.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"}), 422
    )
    refused = api.post("/v1/images/generations", json={"prompt": "x", "n": 0})
    assert refused.json()["error"]["message"] == one_line_error(refused, 422)  # OpenAI's error shape too
    assert one_line_error(api.post("/v1/images/generations", json={"prompt": "x", "size": "big"}), 422)
    assert one_line_error(api.post("/v1/images/generations", json={"prompt": "x", "model": "nope"}), 404)


def test_openai_bearer_key_on_an_api_alone(tmp_path):
    key = "sk-local-0123456789"
    alone = Server(tmp_path, "--nowebui", "--api-key", key)
    try:
        with httpx.Client(base_url=alone.url, timeout=120) as client:
            assert client.get("/").status_code == 404  # no web app
            assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
            wrong = client.post(
                "/v1/images/generations",
                json={"prompt": "x"},
                headers={"Authorization": "Bearer sk-wrong-000000"},
            )
            assert wrong.status_code == 401 and wrong.json()["error"]["message"]
            ok = client.post(
                "/v1/images/generations",
                json={"prompt": "x", "size": "64x64", "seed": 7},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert ok.status_code == 200 and decoded(ok.json()["data"][0]["b64_json"]).size == (64, 64)
            big = client.post(
                "/sdapi/v1/txt2img",
                content=b"x" * (80 * 2**20),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            assert big.status_code == 413
    finally:
        alone.close()


# -- bad input -----------------------------------------------------------------------------------


def _huge_png_header() -> str:
    """A PNG whose header claims 20000x20000 pixels (the data is never decoded)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return base64.b64encode(bytes(data)).decode()


BAD = [
    ("txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("txt2img", {"prompt": 5}, 422, "prompt"),
    ("txt2img", {"prompt": "x", "width": 4096, "height": 4096}, 422, "--max-pixels"),
    ("txt2img", {"prompt": "x", "width": 65}, 422, "multiple of 8"),
    ("txt2img", {"prompt": "x", "sampler_name": "Turbo 9000"}, 404, "sampler"),
    (
        "txt2img",
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope [12345678]"}},
        404,
        "not found",
    ),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422, ".."),
    (
        "txt2img",
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "/etc/passwd"}},
        422,
        "absolute",
    ),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_vae": "missing-vae"}}, 404, "vae"),
    ("txt2img", {"prompt": "x", "override_settings": {"show_progressbar": True}}, 422, "show_progressbar"),
    (
        "txt2img",
        {"prompt": "x", "enable_hr": True, "hr_upscaler": "Latent (bogus)"},
        422,
        "unknown hires upscaler",
    ),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_checkpoint_name": "other"}, 422, "hires pass"),
    ("txt2img", {"prompt": "x", "restore_faces": True}, 422, "face restoration"),
    ("txt2img", {"prompt": "x", "promt": "typo"}, 422, "did you mean prompt"),
    ("txt2img", {"prompt": "x", "init_images": ["abc"]}, 422, "img2img"),
    ("img2img", {"prompt": "x"}, 422, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["not base64 at all!"]}, 422, "base64"),
    (
        "img2img",
        {"prompt": "x", "init_images": [base64.b64encode(b"hello, not an image").decode()]},
        422,
        "readable",
    ),
    ("img2img", {"prompt": "x", "init_images": [12]}, 422, "base64"),
    ("img2img", {"prompt": "x", "init_images": ["/etc/passwd"]}, 422, "image"),
    ("img2img", {"prompt": "x", "init_images": [_huge_png_header()]}, 422, "too large"),
    (
        "img2img",
        {
            "prompt": "x",
            "init_images": [png_b64(Image.new("RGB", (64, 64)))],
            "inpainting_fill": 9,
            "mask": png_b64(Image.new("L", (64, 64))),
        },
        422,
        "inpainting_fill",
    ),
    (
        "img2img",
        {"prompt": "x", "init_images": [png_b64(Image.new("RGB", (64, 64)))], "mask": "%%%"},
        422,
        "mask",
    ),
    ("png-info", {"image": "bm9wZQ=="}, 422, "readable"),
    ("png-info", {}, 422, "image"),
    (
        "txt2img",
        {"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [{"module": "none"}]}}},
        422,
        "image is missing",
    ),
    (
        "txt2img",
        {
            "prompt": "x",
            "alwayson_scripts": {
                "controlnet": {"args": [{"image": png_b64(Image.new("RGB", (64, 64))), "model": "../../x"}]}
            },
        },
        422,
        "..",
    ),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"adetailer": {"args": []}}}, 422, "adetailer"),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), BAD, ids=[f"{r}-{w}" for r, _, _, w in BAD])
def test_bad_input_gets_a_one_line_answer(api, route, body, status, words):
    detail = one_line_error(api.post(f"/sdapi/v1/{route}", json=body), status)
    assert words.lower() in detail.lower()


def test_malformed_bodies_and_the_server_keeps_serving(api):
    assert one_line_error(
        api.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"}), 422
    )
    assert one_line_error(api.post("/sdapi/v1/txt2img", json=["a", "list"]), 422)
    assert one_line_error(
        api.post(
            "/sdapi/v1/txt2img",
            content="\udcff".encode("utf-8", "surrogatepass"),
            headers={"Content-Type": "application/json"},
        ),
        422,
    )
    assert one_line_error(
        api.post(
            "/sdapi/v1/txt2img",
            content=b'{"prompt": "\\ud800"}',
            headers={"Content-Type": "application/json"},
        ),
        422,
    )
    too_big = api.post(
        "/sdapi/v1/img2img", content=b"0" * (3 * 2**20), headers={"Content-Type": "application/json"}
    )
    assert too_big.status_code == 413 and "--max-upload-mb" in too_big.json()["detail"]
    assert one_line_error(api.get("/api/v1/jobs/../../etc/passwd"), 404)
    assert api.get("/sdapi/v1/samplers").status_code == 200


# -- the same seed through the web app, the command line and the API -----------------------------------


def test_same_seed_same_pixels_through_web_app_cli_and_api(api, server, tmp_path):
    prompt = "a small yellow square at the top left on a purple background"
    through_api = pixels(
        decoded(
            api.post(
                "/sdapi/v1/txt2img",
                json={
                    "prompt": prompt,
                    "steps": 2,
                    "seed": 1234,
                    "width": 64,
                    "height": 64,
                    "sampler_name": "DPM++ 2M",
                    "scheduler": "Karras",
                },
            ).json()["images"][0]
        )
    )
    web = call(
        server.client(),
        "txt2img",
        Prompt=prompt,
        Steps=2,
        Width=64,
        Height=64,
        Sampler="DPM++ 2M Karras",
        **{"Seed (-1 = random)": 1234},
    )
    through_web = pixels(Image.open(web[2][0]["image"]))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "generate",
            "--models-dir",
            str(MODELS),
            "--prompt",
            prompt,
            "--steps",
            "2",
            "--seed",
            "1234",
            "--width",
            "64",
            "--height",
            "64",
            "--sampler",
            "DPM++ 2M Karras",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    through_cli = pixels(Image.open(done.stdout.strip().splitlines()[-1]))
    assert np.array_equal(through_api, through_web)
    assert np.array_equal(through_api, through_cli)


def test_a1111_schedule_names_pick_the_few_step_samplers(api):
    assert {"sgm_uniform", "karras"} <= {item["name"] for item in api.get("/sdapi/v1/schedulers").json()}
    body = {"prompt": "a square", **QUICK, "sampler_name": "Euler", "scheduler": "sgm_uniform"}
    answer = api.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert "Sampler: Euler SGM Uniform" in info["infotexts"][0]
    lcm = api.post(
        "/sdapi/v1/txt2img", json={**body, "sampler_name": "LCM", "scheduler": "Automatic", "cfg_scale": 1}
    )
    assert lcm.status_code == 200 and "Sampler: LCM," in json.loads(lcm.json()["info"])["infotexts"][0]


def test_a_huge_schedule_name_is_refused_in_a_short_answer(api):
    body = {"prompt": "a square", **QUICK, "sampler_name": "Euler", "scheduler": "sgm_" * 25_000}
    answer = api.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 404 and "not found" in answer.text and len(answer.text) < 2_000
