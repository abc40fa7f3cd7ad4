"""The evaluation harness: a perfect stand-in engine scores perfectly, and the real engine runs it
end to end on a tiny random-weight model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from training.analyse import label_components
from training.evaluate import (
    PSNR_CAP,
    STRENGTHS,
    TASK_ORDER,
    evaluate,
    format_table,
    img2img_steps,
    inpaint_pair,
    psnr,
)
from training.phrasing import read_pair_caption
from training.shapes import COLORS, PALETTE, POSITIONS, SHAPES, SIZES, Scene
from webui.engine.context import OutputImage
from webui.engine.pipeline import Engine, GenerationResult
from webui.errors import InvalidRequestError
from webui.plugins import make_plugin_manager

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes: a free phrasing read back, else the template's words (parts
    left out get a fixed default)."""
    from training.phrasing import read_caption

    phrased = read_caption(caption)
    if phrased is not None:
        return phrased
    words = caption.split()
    size = next((w for w in words if w in SIZES), "large")
    color = next(w for w in words if w in COLORS)
    shape = next(w for w in words if w in SHAPES)
    background = words[words.index("background") - 1] if "background" in words else "gray"
    position = "center"
    if " at the " in caption:
        position = caption.split(" at the ")[1].split(" on a ")[0]
    assert position in POSITIONS
    return Scene(shape=shape, color=color, size=size, position=position, background=background)


class OracleEngine:
    """Draws exactly what each request asks for, as a perfect model would."""

    def __init__(self) -> None:
        self.requests = []
        # the model's recommended guidance, as a loaded bundle tells it (evaluate's default)
        self.models = SimpleNamespace(get=lambda name: SimpleNamespace(default_cfg_scale=2.5))

    def generate(self, request):
        request = request.validate()
        self.requests.append(request)
        pair = read_pair_caption(request.prompt)
        if pair is not None:
            return self._pair(request, pair)
        scene = parse_caption(request.prompt)
        images = []
        for k in range(request.batch_size):
            if request.task == "txt2img":
                image, _ = scene.render(request.width)
            elif request.task == "seg2img":
                seg = np.asarray(request.seg_map)
                classes = np.argmin(
                    ((seg[..., None, :].astype(int) - np.asarray(PALETTE)) ** 2).sum(-1), axis=-1
                )
                pixels = np.where(classes[..., None] > 0, COLORS[scene.color], COLORS[scene.background])
                image = Image.fromarray(pixels.astype(np.uint8))
            elif request.task == "inpaint":
                wanted, _ = scene.render(request.width)
                image = Image.composite(wanted, request.init_image, request.mask)
            else:  # img2img: move from the init image towards the described scene with strength
                wanted, _ = scene.render(request.width)
                image = Image.blend(request.init_image, wanted, request.strength)
            images.append(OutputImage(image=image, seed=request.seed + k, index=k))
        return GenerationResult(images=images)

    def _pair(self, request, pair):
        """Two shapes: as the prompt says them (txt2img), or each shape of the map in its colour."""
        if request.task == "txt2img":
            image, _ = pair.render(request.width)
        else:
            seg = np.asarray(request.seg_map)
            classes = np.argmin(((seg[..., None, :].astype(int) - np.asarray(PALETTE)) ** 2).sum(-1), axis=-1)
            parts, count = label_components(classes > 0)
            first = parts == 1 if count == 2 else classes == 1 + SHAPES.index(pair.first.shape)
            pixels = np.where(first[..., None], COLORS[pair.first.color], COLORS[pair.second.color])
            image = Image.fromarray(
                np.where(classes[..., None] > 0, pixels, COLORS[pair.background]).astype(np.uint8)
            )
        return GenerationResult(
            images=[
                OutputImage(image=image, seed=request.seed + k, index=k) for k in range(request.batch_size)
            ]
        )


def test_a_perfect_engine_scores_perfectly():
    engine = OracleEngine()
    scores = evaluate(engine, "oracle", n=6, steps=3, batch_size=4)
    assert scores["txt2img"]["adherence"] == 1.0
    assert all(
        scores["txt2img"][name] == 1.0 for name in ("color", "shape", "position", "background", "size")
    )
    assert scores["seg2img"]["miou"] == pytest.approx(1.0)
    assert scores["inpaint"]["unmasked_identical"] is True
    assert scores["inpaint"]["psnr_unmasked"] == PSNR_CAP
    assert scores["inpaint"]["adherence"] == 1.0 and scores["inpaint"]["coverage"] == 1.0
    assert scores["img2img"]["monotonic"] is True
    assert scores["img2img"]["recoloured"][-1] == 1.0
    assert all(entry["met"] for entry in scores["targets"].values())
    for task in ("phrased", "held_out"):  # free phrasings, read as the scene they describe
        assert scores[task]["adherence"] == 1.0 and f"{task} adherence" in scores["targets"]
    for task in ("pair_phrased", "pair_held_out"):  # two objects, every fact
        assert all(
            scores[task][name] == 1.0 for name in ("adherence", "colors", "shapes", "relation", "sizes")
        )
    assert scores["targets"]["pair_held_out adherence"]["met"]
    assert scores["pair_seg2img"]["miou"] == pytest.approx(1.0)
    assert scores["config"]["cfg_scale"] == 2.5 and {r.cfg_scale for r in engine.requests} == {2.5}
    # batching: 6 images in requests of 4 + 2, seeds seed + k; img2img gets enough steps for 0.2
    txt = [r for r in engine.requests if r.task == "txt2img"]
    # template, 2 phrasings, 2 pair phrasings
    assert [(r.batch_size, r.seed) for r in txt] == [(4, 12345), (2, 12349)] * 5
    i2i = [r for r in engine.requests if r.task == "img2img"]
    assert {r.steps for r in i2i} == {5} and len(i2i) == len(STRENGTHS)
    assert all(r.width == r.height == 64 for r in engine.requests)
    inp = [r for r in engine.requests if r.task == "inpaint"]
    assert all(r.mask_blur == 0 and r.strength == 1.0 and r.keep_unmasked for r in inp)


def test_scenes_are_reproducible_and_independent_of_the_engine():
    first, second = OracleEngine(), OracleEngine()
    evaluate(first, None, n=3, steps=2, tasks=("txt2img",))
    evaluate(second, None, n=3, steps=2, tasks=("txt2img",))
    assert [r.prompt for r in first.requests] == [r.prompt for r in second.requests]
    other = OracleEngine()
    evaluate(other, None, seed=999, n=3, steps=2, tasks=("txt2img",))
    assert [r.prompt for r in other.requests] != [r.prompt for r in first.requests]


def test_helpers():
    assert psnr(np.zeros(4), np.zeros(4)) == PSNR_CAP
    assert psnr(np.zeros(4), np.full(4, 255.0)) == pytest.approx(0.0)
    assert img2img_steps(2) == 5 and img2img_steps(20) == 20
    a, b, mask = inpaint_pair(random.Random(3))
    assert a.background == b.background and a.position != b.position and b.color != b.background
    assert not (mask & (a.render()[1] > 0)).any()
    assert mask[b.render()[1] > 0].all()
    with pytest.raises(InvalidRequestError):
        evaluate(OracleEngine(), None, n=0)
    with pytest.raises(InvalidRequestError):
        evaluate(OracleEngine(), None, tasks=("upscale",))


def _check_ranges(scores):
    for task in TASK_ORDER:
        assert task in scores
    t2i = scores["txt2img"]
    for name in ("adherence", "color", "shape", "position", "background", "size", "found"):
        assert 0.0 <= t2i[name] <= 1.0
    assert 0.0 <= scores["seg2img"]["miou"] <= 1.0
    inp = scores["inpaint"]
    assert 0.0 <= inp["adherence"] <= 1.0 and 0.0 <= inp["coverage"] <= 1.0
    assert 0.0 < inp["psnr_unmasked"] <= PSNR_CAP
    i2i = scores["img2img"]
    assert i2i["strengths"] == list(STRENGTHS) and len(i2i["mean_abs_diff"]) == len(STRENGTHS)
    assert all(0.0 <= d <= 255.0 for d in i2i["mean_abs_diff"])
    assert isinstance(i2i["monotonic"], bool)
    for task in ("pair_phrased", "pair_held_out"):
        assert all(
            0.0 <= scores[task][name] <= 1.0 for name in ("adherence", "colors", "relation", "two_objects")
        )
    assert 0.0 <= scores["pair_seg2img"]["miou"] <= 1.0
    json.dumps(scores)  # JSON-ready


def test_end_to_end_on_a_tiny_model(tiny_model_dir):
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    scores = evaluate(engine, str(tiny_model_dir), n=2, steps=2, batch_size=2)
    _check_ranges(scores)
    # keep_unmasked with no mask blur: pixels outside the mask come back unchanged
    assert scores["inpaint"]["unmasked_identical"] is True
    assert scores["inpaint"]["psnr_unmasked"] == PSNR_CAP
    table = format_table(scores)
    assert table.splitlines()[0] == "| task | metric | value | target |"
    for task in TASK_ORDER:
        assert f"| {task} |" in table
    assert "identical" in table


@pytest.mark.slow
def test_cli_evaluate_writes_table_and_json(tiny_model_dir, tmp_path):
    out = tmp_path / "scores.json"
    process = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--n",
            "1",
            "--steps",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr
    assert "| task | metric | value | target |" in process.stdout
    scores = json.loads(out.read_text())
    _check_ranges(scores)
    assert scores["config"]["n"] == 1 and scores["config"]["steps"] == 1


def test_cli_evaluate_runs_chosen_tasks_and_draws_the_held_out_sheet(tiny_model_dir, tmp_path, capsys):
    from webui.cli import _task_list, build_parser, main

    assert _task_list(",".join(TASK_ORDER)) == TASK_ORDER  # the command knows every task
    sheet = tmp_path / "sheet.png"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--n", "2", "--steps", "1", "--batch-size", "2"]
    code = main([*argv, "--tasks", "held_out, pair_held_out", "--sheet", str(sheet), "--sheet-count", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "| held_out |" in out and "| pair_held_out |" in out and "| txt2img |" not in out
    image = Image.open(sheet).convert("RGB")
    assert image.size == (4 * 208 + 8, 128 + 44 + 16)  # two images (one per task) in a row of four cells
    frames = {image.getpixel((5 + k * 208, 5)) for k in range(2)}  # each framed green or red by its verdict
    assert frames <= {(40, 160, 60), (200, 40, 40)} and len(frames) >= 1
    assert image.getpixel((8 + 2 * 208 + 50, 50)) == (255, 255, 255)  # the empty cells stay blank
    code = main([*argv, "--tasks", "txt2img", "--sheet", str(tmp_path / "none.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--sheet draws the held_out and pair_held_out" in err
    assert "images 1-" not in err and not (tmp_path / "none.png").exists()  # refused before any work
    code = main([*argv, "--tasks", "held_out", "--sheet", str(tmp_path)])  # a folder, not a file
    err = capsys.readouterr().err
    assert code == 2 and f"error: --sheet {tmp_path}: Is a directory" in err and "Traceback" not in err
    for bad in ("upscale", "", ",", "txt2img,../x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["evaluate", "--tasks", bad])
        assert "choose from txt2img" in capsys.readouterr().err
    # the sampler of every request: recorded with the scores; an unknown one refused before any work
    scores = tmp_path / "euler.json"
    code = main([*argv, "--tasks", "txt2img", "--sampler", "euler a", "--json", str(scores)])
    assert code == 0 and json.loads(scores.read_text())["config"]["sampler"] == "euler a"
    capsys.readouterr()
    code = main([*argv, "--tasks", "txt2img", "--sampler", "no such sampler"])
    captured = capsys.readouterr()
    assert (
        code == 2 and "unknown sampler 'no such sampler'" in captured.err and "Traceback" not in captured.err
    )
    assert "images 1-" not in captured.err
