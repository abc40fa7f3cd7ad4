"""``launch.py generate``'s options come from the field registry: one flag per field (plugins'
fields too), ``--set NAME=VALUE`` for any field, plugin tasks with ``--task``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui.cli import main
from webui.metadata import parse_infotext, read_png_parameters

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--sampler", "Euler"]

DROP_IN = """
import numpy as np
from PIL import Image
from webui.api import hookimpl

LATENT_STUDIO_API = 1


@hookimpl
def register_tasks(register):
    register("tint", "Tint", requires=("tint_color",), message="tint needs --tint-color")


@hookimpl
def register_fields(register):
    register("tint_color", "choice", choices=("red", "green"), tasks=("tint",), infotext="Tint")
    register("tint_amount", "int", default=50, minimum=0, maximum=255, tasks=("tint",), infotext="Tint amount",
             record="always")


@hookimpl
def postprocess_images(images, request, context):
    if request.task != "tint":
        return
    channel = 0 if request.extra["tint_color"] == "red" else 1
    for item in images:
        array = np.asarray(item.image, dtype=np.int16).copy()
        array[..., channel] = np.clip(array[..., channel] + request.extra["tint_amount"], 0, 255)
        item.image = Image.fromarray(array.astype(np.uint8))
"""


def run(*args: str | os.PathLike[str], plugin_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if plugin_dir is not None:
        env["LATENT_STUDIO_PLUGIN_DIRS"] = str(plugin_dir)
    return subprocess.run(
        [sys.executable, "launch.py", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def written(process: subprocess.CompletedProcess[str]) -> list[Path]:
    assert process.returncode == 0, process.stderr
    return [Path(line) for line in process.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_help_lists_a_flag_per_field_with_its_range():
    process = run("generate", "--help")
    assert process.returncode == 0, process.stderr
    text = " ".join(process.stdout.split())
    for flag in (
        "--cfg-rescale",
        "--vae",
        "--clip-skip",
        "--eta",
        "--invert-mask",
        "--no-invert-mask",
        "--masked-content",
        "--control-end",
        "--set NAME=VALUE",
    ):
        assert flag in text, flag
    assert "0..1" in text and "default 0" in text  # --cfg-rescale's range and default from its declaration


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "cfg_rescal=0.5"], "unknown field 'cfg_rescal'; did you mean cfg_rescale"),
        (["--set", "cfg_rescale"], "--set 'cfg_rescale': write NAME=VALUE"),
        (["--set", "cfg_rescale=high"], "cfg_rescale must be a number, got 'high'"),
        (["--cfg-rescale", "2"], "cfg_rescale must be between 0 and 1, got 2"),
        (["--steps", "x" * 10_000], "steps must be a whole number"),
        (
            ["--masked-content", "everything"],
            "unknown masked_content 'everything'; choose one of original, fill",
        ),
        (["--set", "invert_mask=maybe"], "invert_mask must be true or false"),
        (["--task", "nope"], "unknown task 'nope'; choose one of txt2img, img2img, inpaint, seg2img"),
    ],
)
def test_bad_field_values_fail_before_a_model_is_loaded(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["generate", "--prompt", "x", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *args]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error
    assert not out.exists()


@pytest.mark.slow
def test_plugin_field_by_flag_and_by_set_reaches_the_image(tiny_model_dir, tmp_path):
    common = ["generate", "--prompt", "a red circle", *SMALL, "--cfg-scale", "7", "--model", tiny_model_dir]
    plain = written(run(*common, "--out", tmp_path / "plain"))[0]
    flag = written(run(*common, "--cfg-rescale", "0.7", "--out", tmp_path / "flag"))[0]
    by_set = written(run(*common, "--set", "cfg_rescale=0.7", "--out", tmp_path / "set"))[0]
    assert parse_infotext(read_png_parameters(flag))["CFG rescale"] == "0.7"
    assert "CFG rescale" not in parse_infotext(read_png_parameters(plain))
    assert np.array_equal(np.asarray(Image.open(flag)), np.asarray(Image.open(by_set)))
    assert not np.array_equal(np.asarray(Image.open(flag)), np.asarray(Image.open(plain)))


@pytest.mark.slow
def test_plugin_task_from_a_drop_in_runs_with_its_own_flags(tiny_model_dir, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tint.py").write_text(DROP_IN)
    common = ["generate", "--prompt", "a red circle", *SMALL, "--model", tiny_model_dir]
    missing = run(*common, "--task", "tint", "--out", tmp_path / "none", plugin_dir=plugins)
    assert missing.returncode == 2 and missing.stderr.strip() == "error: tint needs --tint-color"
    plain = written(run(*common, "--out", tmp_path / "plain", plugin_dir=plugins))[0]
    tinted = written(
        run(
            *common,
            "--task",
            "tint",
            "--tint-color",
            "green",
            "--set",
            "tint_amount=100",
            "--out",
            tmp_path / "tint",
            plugin_dir=plugins,
        )
    )[0]
    assert tinted.parent.parent.name == "tint"  # outputs/<task>/<date>/
    before = np.asarray(Image.open(plain), dtype=np.int16)
    after = np.asarray(Image.open(tinted), dtype=np.int16)
    assert np.array_equal(after[..., 1], np.clip(before[..., 1] + 100, 0, 255))
    assert np.array_equal(after[..., 0], before[..., 0])
    parsed = parse_infotext(read_png_parameters(tinted))
    assert parsed["Tint"] == "green" and parsed["Tint amount"] == "100"
    # without the plugin, the task and its flags do not exist
    gone = run(*common, "--task", "tint", "--out", tmp_path / "gone")
    assert gone.returncode == 2 and gone.stderr.startswith(
        "error: unknown task 'tint'; choose one of txt2img"
    )
