"""Image upscalers and the Extras tab: tiny random ESRGAN (old and new key layouts) and Real-ESRGAN
Compact state dicts built here, detected and run through spandrel, tiled and untiled; Lanczos and
Nearest; the pickle rule; hostile files and names; the Extras tab, the command line and the HTTP API.
"""

from __future__ import annotations

import base64
import datetime
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from webui.cli import main as cli_main
from webui.engine.pipeline import Engine
from webui.engine.upscalers import upscale_tensor
from webui.errors import InvalidRequestError, ModelLoadError
from webui.limits import LimitExceeded, Limits
from webui.metadata import read_png_parameters
from webui.plugins import make_plugin_manager
from webui.postprocess import POSTPROCESSING_KEY, save_extras, upscale_image

pytestmark = pytest.mark.slow  # model runs and many generations: left out of the quick run

GC = 32  # the growth channels of ESRGAN's residual dense blocks (fixed in the architecture)
PARAMETERS = (
    "a red square\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 4242, Size: 24x16"
)


# -- tiny random models, in the key names spandrel detects ---------------------------------------


def _conv(
    state: dict[str, torch.Tensor], key: str, out_ch: int, in_ch: int, gen: torch.Generator, bias: float = 0.0
) -> None:
    """A 3x3 convolution's random weights, scaled to keep the signal's size from layer to layer."""
    state[f"{key}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) / (3 * in_ch**0.5)
    state[f"{key}.bias"] = torch.randn(out_ch, generator=gen) * 0.01 + bias


def esrgan_old(*, nf: int = 8, blocks: int = 1, scale: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout (``model.0``, ``model.1.sub.N.RDBr.convk.0``, numbered upsampling)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "model.0", nf, 3, gen)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                _conv(
                    state,
                    f"model.1.sub.{block}.RDB{rdb}.conv{k}.0",
                    nf if k == 5 else GC,
                    nf + (k - 1) * GC,
                    gen,
                )
    _conv(state, f"model.1.sub.{blocks}", nf, nf, gen)  # the trunk's last convolution
    index = 3
    for _ in range(scale.bit_length() - 1):  # [upsample, conv, activation] per doubling
        _conv(state, f"model.{index}", nf, nf, gen)
        index += 3
    _conv(state, f"model.{index - 1}", nf, nf, gen)  # high-resolution convolution
    _conv(state, f"model.{index + 1}", 3, nf, gen, bias=0.5)  # the last one: mid-grey on average
    return state


def esrgan_new(*, nf: int = 8, blocks: int = 1, scale: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """The BasicSR / Real-ESRGAN layout (``conv_first``, ``body.N.rdbr.convk``, ``conv_upN``...)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv_first", nf, 3, gen)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                _conv(state, f"body.{block}.rdb{rdb}.conv{k}", nf if k == 5 else GC, nf + (k - 1) * GC, gen)
    _conv(state, "conv_body", nf, nf, gen)
    for up in range(1, scale.bit_length()):
        _conv(state, f"conv_up{up}", nf, nf, gen)
    _conv(state, "conv_hr", nf, nf, gen)
    _conv(state, "conv_last", 3, nf, gen, bias=0.5)
    return state


def compact(*, nf: int = 8, convs: int = 1, scale: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact: convolutions and PReLUs in ``body``, a pixel shuffle at the end."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "body.0", nf, 3, gen)
    state["body.1.weight"] = torch.full((nf,), 0.25)
    for i in range(convs):
        _conv(state, f"body.{2 + 2 * i}", nf, nf, gen)
        state[f"body.{3 + 2 * i}.weight"] = torch.full((nf,), 0.25)
    _conv(state, f"body.{2 + 2 * convs}", 3 * scale * scale, nf, gen)
    return state


def engine_over(models: Path, **options) -> Engine:
    return Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=str(models), **options
    )


def picture(width: int = 24, height: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models root with a model in each kind of upscaler folder (ours, A1111's, ComfyUI's)."""
    root = tmp_path_factory.mktemp("models")
    for folder, name, state in (
        ("upscalers", "2x-tiny-esrgan-old", esrgan_old()),
        ("RealESRGAN", "2x-tiny-esrgan-new", esrgan_new()),
        ("upscale_models", "4x-tiny-compact", compact()),
    ):
        (root / folder).mkdir()
        save_file(state, str(root / folder / f"{name}.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return engine_over(models)


# -- the registry ---------------------------------------------------------------------------------


def test_the_list_holds_lanczos_nearest_and_every_upscaler_folder(engine):
    assert engine.upscalers.names() == [
        "Lanczos",
        "Nearest",
        "2x-tiny-esrgan-new",
        "2x-tiny-esrgan-old",
        "4x-tiny-compact",
    ]


@pytest.mark.parametrize(
    ("name", "architecture", "scale"),
    [
        ("2x-tiny-esrgan-old", "ESRGAN", 2),
        ("2x-tiny-esrgan-new", "ESRGAN", 2),
        ("4x-tiny-compact", "RealESRGAN Compact", 4),
    ],
)
def test_spandrel_detects_each_architecture_from_the_weights(engine, name, architecture, scale):
    model = engine.upscalers.load(name)
    assert model.architecture.name == architecture
    assert model.scale == scale
    assert next(model.model.parameters()).dtype == torch.float32  # on the CPU, float32


@pytest.mark.parametrize("name", ["2x-tiny-esrgan-old", "4x-tiny-compact"])
def test_a_model_gives_the_exact_size_asked_for_in_rgb(engine, name):
    source = picture(24, 16).convert("RGBA")
    by_scale = engine.upscalers.upscale(source, name, scale=3)  # 2x twice, then down to 3x
    assert by_scale.mode == "RGB" and by_scale.size == (72, 48)
    to_size = engine.upscalers.upscale(source, name, size=(50, 30))
    assert to_size.mode == "RGB" and to_size.size == (50, 30)
    assert np.asarray(by_scale).std() > 1  # not a blank image


def test_the_model_output_is_the_model_run_on_the_image(engine):
    """No pass, no resize in between: at the model's own scale the image is the model's output."""
    source = picture(12, 10)
    out = engine.upscalers.upscale(source, "4x-tiny-compact", scale=4)
    model = engine.upscalers.load("4x-tiny-compact")
    tensor = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        expected = (model(tensor)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(out), expected)


@pytest.mark.parametrize(
    ("name", "overlap"), [("2x-tiny-esrgan-old", 24), ("2x-tiny-esrgan-new", 24), ("4x-tiny-compact", 8)]
)
def test_tiles_with_overlap_equal_the_whole_image(engine, name, overlap):
    model = engine.upscalers.load(name)
    image = torch.rand(1, 3, 70, 61, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        whole = upscale_tensor(model, image, model.scale, tile=0)
        tiled = upscale_tensor(model, image, model.scale, tile=2 * overlap + 8, overlap=overlap)
        seams = upscale_tensor(model, image, model.scale, tile=2 * overlap + 8, overlap=0)
    assert whole.shape == tiled.shape == (1, 3, 70 * model.scale, 61 * model.scale)
    assert (tiled - whole).abs().max().item() < 1e-4  # the model looks no further than the overlap
    assert (seams - whole).abs().max().item() > 1e-3  # so it is the overlap that removes the seams


def test_tile_size_and_overlap_are_settable_per_call(engine):
    source = picture(40, 36)
    whole = engine.upscalers.upscale(source, "4x-tiny-compact", scale=4, tile=0)
    tiled = engine.upscalers.upscale(source, "4x-tiny-compact", scale=4, tile=24, overlap=8)
    assert np.abs(np.asarray(whole, dtype=int) - np.asarray(tiled, dtype=int)).max() <= 1
    with pytest.raises(InvalidRequestError, match="at least twice the overlap"):
        engine.upscalers.upscale(source, "4x-tiny-compact", scale=4, tile=20, overlap=8)


def test_lanczos_and_nearest_give_exact_sizes():
    engine = engine_over(Path("/nonexistent-models"))
    source = picture(7, 5)
    nearest = engine.upscalers.upscale(source, "Nearest", scale=2)
    assert nearest.size == (14, 10)
    assert np.array_equal(np.asarray(nearest), np.asarray(source).repeat(2, axis=0).repeat(2, axis=1))
    lanczos = engine.upscalers.upscale(source, "lanczos", size=(33, 17))  # names match in any case
    assert lanczos.size == (33, 17) and lanczos.mode == "RGB"
    assert engine.upscalers.upscale(source, "Lanczos", scale=1.5).size == (10, 8)  # rounded


def test_a_pickle_is_refused_without_allow_pickle_and_read_with_it(tmp_path):
    (tmp_path / "ESRGAN").mkdir()
    torch.save({"params_ema": compact(seed=3)}, tmp_path / "ESRGAN" / "4x-pickled.pth")
    refusing = engine_over(tmp_path)
    assert "4x-pickled" in refusing.upscalers.names()
    with pytest.raises(ModelLoadError, match="--allow-pickle") as refused:
        refusing.upscalers.upscale(picture(8, 8), "4x-pickled", scale=4)
    assert "\n" not in str(refused.value)
    allowing = engine_over(tmp_path, allow_pickle=True)
    assert allowing.upscalers.upscale(picture(8, 8), "4x-pickled", scale=4).size == (32, 32)


# -- hostile input --------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_a_file_that_is_not_a_model_and_a_truncated_one_give_one_line(tmp_path):
    folder = tmp_path / "upscalers"
    folder.mkdir()
    (folder / "noise.safetensors").write_bytes(b"\x00" * 5 + b"not a model at all")
    save_file({"text_model.weight": torch.zeros(4, 4)}, str(folder / "not-an-upscaler.safetensors"))
    save_file(compact(), str(folder / "cut.safetensors"))
    whole = (folder / "cut.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(whole[: len(whole) - 100])
    engine = engine_over(tmp_path)
    with pytest.raises(ModelLoadError) as noise:
        engine.upscalers.upscale(picture(), "noise", scale=2)
    assert "safetensors" in one_line(noise)
    with pytest.raises(ModelLoadError) as unrelated:
        engine.upscalers.upscale(picture(), "not-an-upscaler", scale=2)
    assert "not an upscaler model" in one_line(unrelated)
    with pytest.raises(ModelLoadError) as cut:
        engine.upscalers.upscale(picture(), "cut", scale=2)
    assert "truncated" in one_line(cut)


def test_a_huge_target_is_refused_before_any_work(engine, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded for a refused size")

    monkeypatch.setattr(engine.upscalers, "load", no_work)
    with pytest.raises(LimitExceeded, match="--max-pixels") as refused:
        engine.upscalers.upscale(picture(64, 64), "4x-tiny-compact", scale=100)
    one_line(refused)
    with pytest.raises(LimitExceeded):
        engine.upscalers.upscale(picture(64, 64), "Lanczos", size=(100_000, 100_000))
    small = engine_over(Path("/nonexistent-models"), limits=Limits(max_pixels=1000))
    with pytest.raises(LimitExceeded, match="1000"):
        small.upscalers.upscale(picture(20, 20), "Nearest", scale=2)


@pytest.mark.parametrize(
    "name", ["../upscalers/4x-tiny-compact", "/etc/passwd", "upscale_models/4x-tiny-compact", "~x"]
)
def test_a_name_with_a_path_is_refused(engine, name):
    with pytest.raises(InvalidRequestError, match="not allowed") as refused:
        engine.upscalers.upscale(picture(), name, scale=2)
    one_line(refused)


def test_an_unknown_name_names_the_known_ones(engine):
    with pytest.raises(InvalidRequestError) as unknown:
        engine.upscalers.upscale(picture(), "8x-missing", scale=2)
    message = one_line(unknown)
    assert (
        "unknown upscaler '8x-missing'" in message and "Lanczos" in message and "4x-tiny-compact" in message
    )


def test_bad_scales_and_sizes_are_refused(engine):
    for kwargs in (
        {"scale": 0},
        {"scale": float("nan")},
        {"size": (0, 10)},
        {"scale": 2, "size": (4, 4)},
        {},
    ):
        with pytest.raises(InvalidRequestError) as refused:
            engine.upscalers.upscale(picture(), "Lanczos", **kwargs)
        one_line(refused)


# -- extras: the shared steps, the tab, the command line -------------------------------------------


def drawing() -> Image.Image:
    """A small picture with edges and flat areas (what upscalers are for)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (64, 48), (30, 60, 120))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 36, 36), fill=(230, 60, 40))
    draw.rectangle((34, 20, 58, 42), fill=(250, 220, 60))
    draw.line((0, 47, 63, 0), fill=(255, 255, 255), width=2)
    return image


def png_with_parameters(path: Path, image: Image.Image) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", PARAMETERS)
    image.save(path, pnginfo=info)
    return path


def test_extras_keep_the_parameters_and_note_the_upscale(engine, tmp_path):
    result = upscale_image(engine, picture(), "2x-tiny-esrgan-new", scale=2, parameters=PARAMETERS)
    saved = save_extras(result, tmp_path)
    assert saved.parent == tmp_path / "extras" / datetime.date.today().strftime("%Y-%m-%d")
    assert saved.name.endswith("-4242.png")
    with Image.open(saved) as image:
        assert image.size == (48, 32)
        assert image.text["parameters"] == PARAMETERS
        assert (
            image.text[POSTPROCESSING_KEY]
            == "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny-esrgan-new"
        )


def test_extras_resize_to_with_crop_and_a_blended_second_upscaler(engine):
    source = picture(24, 16)
    covered = upscale_image(engine, source, "Nearest", size=(30, 30))
    assert covered.image.size == (45, 30)  # covers 30x30, the aspect kept
    cropped = upscale_image(engine, source, "Nearest", size=(30, 30), crop=True)
    assert cropped.image.size == (30, 30)
    assert np.array_equal(np.asarray(cropped.image), np.asarray(covered.image)[:, 7:37])
    blended = upscale_image(engine, source, "Nearest", scale=2, upscaler_2="Lanczos", visibility=0.5)
    nearest = np.asarray(engine.upscalers.upscale(source, "Nearest", scale=2), dtype=float)
    lanczos = np.asarray(engine.upscalers.upscale(source, "Lanczos", scale=2), dtype=float)
    assert np.abs(np.asarray(blended.image, dtype=float) - (nearest + lanczos) / 2).max() <= 1
    assert blended.info["Postprocess upscaler 2"] == "Lanczos"


def extras_function(demo):
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == "extras")


def test_the_extras_tab_upscales_one_image_or_a_batch_and_keeps_parameters(engine, tmp_path):
    from webui.testing import build_ui, ui_components

    demo = build_ui(engine, tmp_path / "outputs")
    components = ui_components(demo)
    assert "4x-tiny-compact" in components["extras-upscaler"].choices[-1]
    upscale = extras_function(demo)
    source = png_with_parameters(tmp_path / "source.png", picture(24, 16))
    shown, note = upscale(
        "Single image", str(source), None, "Scale by", 2, 512, 512, True, "4x-tiny-compact", "None", 0
    )
    assert note == "Postprocess upscale by: 2, Postprocess upscaler: 4x-tiny-compact"
    ((path, caption),) = shown
    assert caption == "48x32"
    assert Path(path).parent.parent == tmp_path / "outputs" / "extras"
    assert read_png_parameters(path) == PARAMETERS
    other = tmp_path / "other.png"
    picture(10, 10, seed=1).save(other)
    shown, _ = upscale(
        "Batch", None, [str(source), str(other)], "Scale to", 2, 20, 20, True, "Lanczos", "None", 0
    )
    assert [Image.open(p).size for p, _ in shown] == [(20, 20), (20, 20)]
    assert read_png_parameters(shown[1][0]) is None  # no parameters in, none out


def test_the_extras_tab_gives_one_line_errors(engine, tmp_path):
    import gradio as gr

    from webui.testing import build_ui

    upscale = extras_function(build_ui(engine, tmp_path / "outputs"))
    source = png_with_parameters(tmp_path / "source.png", picture())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    for args, expected in (
        (
            ("Single image", str(source), None, "Scale by", 2, 1, 1, True, "../etc/x", "None", 0),
            "not allowed",
        ),
        (
            ("Single image", str(source), None, "Scale by", 500, 1, 1, True, "Lanczos", "None", 0),
            "--max-pixels",
        ),
        (("Single image", None, None, "Scale by", 2, 1, 1, True, "Lanczos", "None", 0), "drop an image"),
        (
            ("Batch", None, [str(broken)], "Scale by", 2, 1, 1, True, "Lanczos", "None", 0),
            "not a readable image",
        ),
    ):
        with pytest.raises(gr.Error) as error:
            upscale(*args)
        assert expected in error.value.message and "\n" not in error.value.message


def test_the_command_line_lists_upscalers_and_writes_files(models, tmp_path, capsys):
    assert cli_main(["upscalers", "--models-dir", str(models)]) == 0
    assert capsys.readouterr().out.split() == [
        "Lanczos",
        "Nearest",
        "2x-tiny-esrgan-new",
        "2x-tiny-esrgan-old",
        "4x-tiny-compact",
    ]
    source = png_with_parameters(tmp_path / "in.png", picture(24, 16))
    plain = tmp_path / "plain.png"
    picture(8, 8).save(plain)
    out = tmp_path / "out"
    code = cli_main(
        [
            "upscale",
            str(source),
            str(plain),
            "--upscaler",
            "4x-tiny-compact",
            "--scale",
            "2",
            "--output",
            str(out),
            "--models-dir",
            str(models),
        ]
    )
    assert code == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.parent for p in written] == [out, out]
    assert Image.open(written[0]).size == (48, 32) and Image.open(written[1]).size == (16, 16)
    assert read_png_parameters(written[0]) == PARAMETERS
    assert (
        cli_main(
            [
                "upscale",
                str(source),
                "--upscaler",
                "Lanczos",
                "--size",
                "30x20",
                "--crop",
                "--output",
                str(out),
                "--models-dir",
                str(models),
            ]
        )
        == 0
    )
    assert Image.open(capsys.readouterr().out.strip()).size == (30, 20)


def test_the_command_line_refuses_with_one_line(models, tmp_path, capsys):
    source = png_with_parameters(tmp_path / "in.png", picture())
    for argv, expected in (
        (["--upscaler", "nope", "--scale", "2"], "unknown upscaler 'nope'"),
        (["--upscaler", "Lanczos", "--size", "big"], "WIDTHxHEIGHT"),
        (["--upscaler", "Lanczos", "--scale", "1000"], "--max-pixels"),
    ):
        assert (
            cli_main(
                ["upscale", str(source), *argv, "--output", str(tmp_path / "o"), "--models-dir", str(models)]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


# -- the HTTP API ---------------------------------------------------------------------------------


def b64png(image: Image.Image, parameters: str | None = None) -> str:
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


@pytest.fixture(scope="module")
def api(models, tmp_path_factory):
    from ui_server import Server

    server = Server(tmp_path_factory.mktemp("outputs"), "--api", "--extra-models-dir", str(models))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
    server.close()


@pytest.mark.slow
def test_the_api_lists_upscalers_in_a1111s_shape(api):
    listed = api.get("/sdapi/v1/upscalers").json()
    assert [item["name"] for item in listed][:3] == ["None", "Lanczos", "Nearest"]
    compact_item = next(item for item in listed if item["name"] == "4x-tiny-compact")
    assert compact_item == {
        "name": "4x-tiny-compact",
        "model_name": "4x-tiny-compact",
        "model_path": "4x-tiny-compact.safetensors",
        "model_url": None,
        "scale": 4,
    }


@pytest.mark.slow
def test_the_api_upscales_one_image_and_a_batch(api):
    source = picture(24, 16)
    response = api.post(
        "/sdapi/v1/extra-single-image",
        json={"image": b64png(source, PARAMETERS), "upscaler_1": "Nearest", "upscaling_resize": 2},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    out = unb64(body["image"])
    assert np.array_equal(np.asarray(out), np.asarray(source).repeat(2, axis=0).repeat(2, axis=1))
    assert out.text["parameters"] == PARAMETERS
    assert "Postprocess upscaler: Nearest" in body["html_info"]
    batch = api.post(
        "/sdapi/v1/extra-batch-images",
        json={
            "imageList": [
                {"data": b64png(source), "name": "a.png"},
                {"data": b64png(picture(10, 10)), "name": "b"},
            ],
            "resize_mode": 1,
            "upscaling_resize_w": 40,
            "upscaling_resize_h": 40,
            "upscaling_crop": True,
            "upscaler_1": "4x-tiny-compact",
            "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.3,
        },
    )
    assert batch.status_code == 200, batch.text
    images = [unb64(text) for text in batch.json()["images"]]
    assert [image.size for image in images] == [(40, 40), (40, 40)]
    assert all(np.asarray(image).std() > 1 for image in images)


@pytest.mark.slow
def test_the_api_refuses_unknown_upscalers_face_restoration_and_huge_sizes(api):
    image = b64png(picture())
    for body, status, expected in (
        ({"image": image, "upscaler_1": "8x-missing"}, 422, "unknown upscaler"),
        ({"image": image, "upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, 422, "face restoration"),
        ({"image": image, "upscaler_1": "Lanczos", "upscaling_resize": 400}, 422, "--max-pixels"),
        ({"image": image, "upscaler_1": "Lanczos", "tiling": True}, 422, "unknown key 'tiling'"),
        ({"image": "bm90IGFuIGltYWdl", "upscaler_1": "Lanczos"}, 422, "not a readable image"),
    ):
        response = api.post("/sdapi/v1/extra-single-image", json=body)
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert expected in detail and "\n" not in detail


# -- the browser ----------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_the_extras_tab_in_a_browser(browser, tmp_path):
    from ui_server import Server

    server = Server(tmp_path / "outputs")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.get_by_role("tab", name="Extras").click()
        source = png_with_parameters(tmp_path / "source.png", drawing())
        page.locator("#extras-image input[type=file]").first.set_input_files(str(source))
        page.locator("#extras-image img").first.wait_for(timeout=120_000)
        page.locator("#extras-run").click()
        page.locator("#extras-gallery img").first.wait_for(timeout=120_000)
        page.wait_for_function(
            "() => document.querySelector('#extras-info textarea')?.value.includes('Postprocess upscaler: Lanczos')",
            timeout=120_000,
        )
        shots = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "extras.png"), full_page=True)  # the picture in docs/web-app.md
        day = server.outputs / "extras" / datetime.date.today().strftime("%Y-%m-%d")
        saved = sorted(day.glob("*.png"))
        assert len(saved) == 1
        with Image.open(saved[0]) as image:
            assert image.size == (128, 96)
            assert image.text["parameters"] == PARAMETERS
        page.close()
    finally:
        server.close()
