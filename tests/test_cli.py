"""The command line, run for real in a subprocess against a tiny model folder on disk."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import (
    UNET_WEIGHTS,
    copy_model,
    corrupt_unet_weights,
    random_image,
    rect_mask,
    seg_map,
)
from PIL import Image

from webui.metadata import parse_infotext, read_png_parameters
from webui.request import GenerationRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_SAMPLERS = (
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DDIM",
    "UniPC",
    "LMS",
    "Heun",
    "PNDM",
    "DPM2",
)
BUILTIN_HOOKS = {
    "webui.builtin.schedulers": {"register_schedulers"},
    "webui.builtin.loaders": {"load_model", "register_models"},
    "webui.builtin.metadata": {"write_metadata", "parse_metadata"},
    "webui.builtin.text": {"provide_conditioning"},
    "webui.builtin.init_image": {"provide_conditioning"},
    "webui.builtin.masked_image": {"prepare_request", "provide_conditioning", "postprocess_images"},
    "webui.builtin.segmap": {"provide_conditioning"},
}
SMALL = ["--steps", "3", "--width", "64", "--height", "64", "--seed", "1"]


def launch(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "launch.py", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ok(process: subprocess.CompletedProcess[str]) -> list[Path]:
    """The PNG paths a successful ``generate`` printed."""
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    paths = [Path(line) for line in process.stdout.splitlines() if line.strip()]
    assert paths and all(p.suffix == ".png" and p.is_file() for p in paths), process.stdout
    return paths


def days() -> set[str]:
    """Today's output folder name (yesterday's too, in case a run crosses midnight)."""
    today = datetime.date.today()
    return {today.isoformat(), (today - datetime.timedelta(days=1)).isoformat()}


def params_line(path: Path) -> str:
    text = read_png_parameters(path)
    assert text is not None, f"{path} has no parameters chunk"
    return text.split("\n")[-1]


def write_png(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# -- generate -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_txt2img_writes_numbered_pngs_with_a1111_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "generate",
        "--task",
        "txt2img",
        "--prompt",
        "a red circle",
        "--seed",
        "42",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--batch-size",
        "2",
        "--sampler",
        "Euler",
        "--out",
        out,
        "--model",
        tiny_model_dir,
    ]
    first = ok(launch(*args))

    dated = list((out / "txt2img").iterdir())
    assert len(dated) == 1 and dated[0].name in days()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", dated[0].name)
    folder = dated[0]
    assert [p.name for p in first] == ["00000-42.png", "00001-43.png"]
    assert all(p.parent == folder for p in first)
    assert sorted(p.name for p in folder.iterdir()) == ["00000-42.png", "00001-43.png"]

    model_hash = hashlib.sha256((tiny_model_dir / UNET_WEIGHTS).read_bytes()).hexdigest()[:10]
    for path, seed in zip(first, (42, 43), strict=True):
        text = read_png_parameters(path)
        lines = text.split("\n")
        assert lines == ["a red circle", lines[1]]
        assert re.fullmatch(
            rf"Steps: 3, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 64x64, "
            r"Model hash: [0-9a-f]{10}, Model: tiny-sd",
            lines[1],
        ), lines[1]
        assert f"Model hash: {model_hash}," in lines[1]
        parsed = parse_infotext(text)
        assert parsed["Prompt"] == "a red circle" and parsed["Seed"] == str(seed)
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"

    before = {p.name: p.read_bytes() for p in first}
    second = ok(launch(*args))
    assert [p.name for p in second] == ["00002-42.png", "00003-43.png"]
    for path in first:
        assert path.read_bytes() == before[path.name]  # not overwritten
    for old, new in zip(first, second, strict=True):  # same seed, same picture
        with Image.open(old) as a, Image.open(new) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_cfg_scale_defaults_to_the_models_recommendation(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "guided")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "defaults": {"cfg_scale": 3.5}}))
    named = ok(
        launch("generate", "--prompt", "a red circle", *SMALL, "--out", tmp_path / "a", "--model", model)
    )
    assert "CFG scale: 3.5" in params_line(named[0]).split(", ")
    given = ok(
        launch(
            "generate",
            "--prompt",
            "a red circle",
            *SMALL,
            "--cfg-scale",
            "6",
            "--out",
            tmp_path / "b",
            "--model",
            model,
        )
    )
    assert "CFG scale: 6" in params_line(given[0]).split(", ")
    with Image.open(named[0]) as a, Image.open(given[0]) as b:  # the guidance really differs
        assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_img2img_from_init_image(tiny_model_dir, tmp_path):
    init = write_png(random_image(1), tmp_path / "init.png")
    paths = ok(
        launch(
            "generate",
            "--prompt",
            "a red circle",
            "--init-image",
            init,
            *SMALL,
            "--out",
            tmp_path / "out",
            "--model",
            tiny_model_dir,
        )
    )
    assert len(paths) == 1 and paths[0].parent.parent.name == "img2img"
    line = params_line(paths[0])
    assert "Denoising strength: 0.75" in line.split(", ")
    assert line.startswith("Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64, ")


@pytest.mark.slow
def test_inpaint_from_init_image_and_mask(tiny_model_dir, tmp_path):
    init = write_png(random_image(2), tmp_path / "init.png")
    mask = write_png(rect_mask(32), tmp_path / "mask.png")  # another size: resized to the image
    paths = ok(
        launch(
            "generate",
            "--prompt",
            "a red circle",
            "--init-image",
            init,
            "--mask",
            mask,
            *SMALL,
            "--sampler",
            "DDIM",
            "--out",
            tmp_path / "out",
            "--model",
            tiny_model_dir,
        )
    )
    assert len(paths) == 1 and paths[0].parent.parent.name == "inpaint"
    line = params_line(paths[0])
    assert "Denoising strength: 1" in line.split(", ")
    assert "Mask blur: 4" in line.split(", ")
    with Image.open(paths[0]) as result:
        result_arr = np.asarray(result.convert("RGB"))
    # far from the mask the original pixels are kept
    assert np.array_equal(result_arr[:4, -4:], np.asarray(random_image(2))[:4, -4:])


@pytest.mark.slow
def test_seg2img_with_the_model_controlnet(tiny_model_dir, tmp_path):
    seg = write_png(seg_map(), tmp_path / "seg.png")
    paths = ok(
        launch(
            "generate",
            "--prompt",
            "a red circle",
            "--seg-map",
            seg,
            *SMALL,
            "--sampler",
            "Euler",
            "--out",
            tmp_path / "out",
            "--model",
            tiny_model_dir,
        )
    )
    assert len(paths) == 1 and paths[0].parent.parent.name == "seg2img"
    parsed = parse_infotext(read_png_parameters(paths[0]))
    assert parsed["ControlNet 0"].startswith("Module: seg, Model: tiny-sd/controlnet, Weight: 1")


# -- errors ---------------------------------------------------------------------------------------


def _bad_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    folder = copy_model(tiny_model_dir, tmp_path / "corrupt")
    corrupt_unet_weights(folder)
    return folder


def _not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture\n")
    return path


ERROR_CASES = {
    "width-100": (
        lambda tmp, model: ["--width", "100", "--model", model],
        "width 100 is not a multiple of 8; use 96 or 104",
    ),
    "steps-0": (
        lambda tmp, model: ["--steps", "0", "--model", model],
        "steps must be between 1 and 1000, got 0",
    ),
    "unknown-sampler": (
        lambda tmp, model: ["--sampler", "Nope", "--model", model],
        "unknown sampler 'Nope'; available: Euler, Euler a",
    ),
    "strength-1.5": (
        lambda tmp, model: [
            "--init-image",
            write_png(random_image(1), tmp / "init.png"),
            "--strength",
            "1.5",
            "--model",
            model,
        ],
        "strength must be between 0 and 1, got 1.5",
    ),
    "missing-model": (lambda tmp, model: ["--model", tmp / "no-such-model"], "model path does not exist"),
    "corrupt-model": (
        lambda tmp, model: ["--model", _bad_model(tmp, model)],
        "cannot load {tmp}/corrupt/unet",
    ),
    "init-not-an-image": (
        lambda tmp, model: ["--init-image", _not_an_image(tmp), "--model", model],
        "cannot read init image {tmp}/notes.png",
    ),
    "init-missing": (
        lambda tmp, model: ["--init-image", tmp / "missing.png", "--model", model],
        "init image not found: {tmp}/missing.png",
    ),
    # checked before any model is looked at (the model named here does not even exist)
    "out-is-a-file": (
        lambda tmp, model: ["--out", _a_file(tmp), "--model", tmp / "no-such-model"],
        "--out {tmp}/taken.png is not a writable folder (it is a file)",
    ),
    "out-below-a-file": (
        lambda tmp, model: ["--out", _a_file(tmp) / "images", "--model", tmp / "no-such-model"],
        "--out {tmp}/taken.png/images is not a writable folder ({tmp}/taken.png is a file)",
    ),
}


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken.png"
    path.write_bytes(b"an image that is already there")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_print_one_line_and_exit_2(tiny_model_dir, tmp_path, case):
    make_args, expected = ERROR_CASES[case]
    out = tmp_path / "out"
    process = launch(
        "generate",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out,
        *make_args(tmp_path, tiny_model_dir),
    )
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: ")
    assert expected.format(tmp=tmp_path) in lines[0]
    assert process.stdout == ""
    assert not out.exists()


# -- listing commands -----------------------------------------------------------------------------


@pytest.mark.slow
def test_plugins_lists_builtins_as_json():
    process = launch("plugins")
    assert process.returncode == 0, process.stderr
    rows = {row["name"]: row for row in json.loads(process.stdout)}
    for name, hooks in BUILTIN_HOOKS.items():
        row = rows[name]
        assert row["source"] == "builtin"
        assert row["error"] is None
        assert set(row["hooks"]) == hooks
        assert row["hooks"] == sorted(row["hooks"])


@pytest.mark.slow
def test_samplers_lists_the_a1111_names():
    process = launch("samplers")
    assert process.returncode == 0, process.stderr
    names = process.stdout.splitlines()
    for name in REQUIRED_SAMPLERS:
        assert name in names
    assert len(names) == len(set(names))


@pytest.mark.slow
def test_models_lists_the_models_dir(tiny_model_dir):
    process = launch("models", "--models-dir", tiny_model_dir.parent)
    assert process.returncode == 0, process.stderr
    entries = [json.loads(line) for line in process.stdout.splitlines()]
    assert {"name": "tiny-sd", "kind": "checkpoint", "source": str(tiny_model_dir)} in entries
    assert {
        "name": "tiny-sd/controlnet",
        "kind": "controlnet",
        "source": str(tiny_model_dir / "controlnet"),
    } in entries


# -- every listed sampler runs --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices from inside diffusers' schedulers
@pytest.mark.parametrize("sampler", REQUIRED_SAMPLERS)
def test_sampler_runs_two_steps(engine, bundle, sampler):
    request = GenerationRequest(prompt="a red circle", sampler=sampler, steps=2, seed=3, width=64, height=64)
    result = engine.generate(request, bundle=bundle)
    assert len(result.images) == 1
    item = result.images[0]
    assert tuple(item.pixels.shape) == (3, 64, 64)
    assert torch.isfinite(item.pixels).all()
    assert float(item.pixels.std()) > 0.01  # not a constant image
    assert np.asarray(item.image).std() > 1.0
    assert item.parameters["Sampler"] == sampler and item.parameters["Steps"] == 2
