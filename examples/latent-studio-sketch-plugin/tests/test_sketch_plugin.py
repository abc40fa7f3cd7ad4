"""The plugin in an engine, tested with Latent Studio's testing kit (``webui.testing``): a tiny
random model and a tiny edges ControlNet installed in a temporary models folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from latent_studio_sketch import plugin
from PIL import Image

from webui.api import GenerationRequest, InvalidRequestError, parse_infotext
from webui.testing import (
    check_hooks,
    make_engine,
    run_task,
    sample_image,
    save_controlnet,
    tiny_bundle,
    tiny_controlnet,
)

EDGES = "tiny-edges"  # the ControlNet installed in the test's models folder


def drawing(background: int = 255, ink: int = 0, size: int = 64, shift: int = 0) -> Image.Image:
    """Two strokes on plain paper (``shift`` moves the horizontal one down)."""
    pixels = np.full((size, size), background, dtype=np.uint8)
    pixels[20 + shift : 22 + shift, 10:54] = ink
    pixels[10:54, 30:32] = ink
    return Image.fromarray(pixels, "L")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_controlnet(tiny_controlnet(seed=7), folder, EDGES)
    return folder


@pytest.fixture(scope="module")
def engine(models_dir):
    return make_engine(plugin, bundle=tiny_bundle(), models_dir=str(models_dir))


@pytest.fixture(scope="module")
def plain(engine):
    """txt2img with the same seed and settings: the image without the ControlNet."""
    return run_task(engine, "txt2img")


@pytest.fixture(scope="module")
def drawn(engine):
    """sketch2img with :func:`drawing` and every setting at its default."""
    return sketched(engine)


def sketched(engine, sketch=None, **extra):
    """A sketch2img run on ``engine`` with the installed ControlNet."""
    values = {"sketch": drawing() if sketch is None else sketch, "sketch_controlnet": EDGES, **extra}
    return run_task(engine, "sketch2img", extra={k: v for k, v in values.items() if v is not ...})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def error_of(engine, **fields) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        run_task(engine, **fields)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300
    return message


# --- the contract -----------------------------------------------------------------------------


def test_hooks_fit_the_contract():
    check_hooks(plugin)


def test_the_task_and_its_fields_are_registered(engine):
    assert all(record.error is None for record in engine.plugins.records.values())
    task = engine.fields.tasks["sketch2img"]
    assert task.label == "Sketch to image" and task.plugin is not None
    declared = {
        item.name: item for item in engine.fields.for_task("sketch2img") if item.plugin == task.plugin
    }
    assert list(declared) == list(plugin.FIELD_NAMES)
    assert (declared["sketch"].kind, declared["sketch"].widget) == ("image", "sketch")
    assert (declared["sketch_photo"].kind, declared["sketch_photo"].widget) == ("image", "upload")
    assert declared["sketch_controlnet"].source == "models:controlnet"
    for item in declared.values():
        assert item.tasks == ("sketch2img",) and item.label and item.help
        assert (item.infotext is not None) == (item.kind != "image")
    assert not any(item.plugin == task.plugin for item in engine.fields.for_task("txt2img"))


def test_the_controlnet_in_the_models_folder_is_a_choice(engine):
    assert EDGES in [entry.name for entry in engine.models.list("controlnet")]
    model = engine.models.get_controlnet(EDGES)
    assert type(model).__name__ == "ControlNetModel"


# --- generation -------------------------------------------------------------------------------


def test_the_sketch_steers_the_image(engine, plain, drawn):
    plain = pixels(plain)
    assert drawn.images[0].image.size == (64, 64)
    assert np.abs(pixels(drawn) - plain).max() > 0  # the ControlNet changed the image
    moved = pixels(sketched(engine, drawing(shift=20)))
    assert np.abs(moved - pixels(drawn)).max() > 0  # other lines, another image
    # a ControlNet at weight 0 adds nothing: exactly the image without it
    assert np.array_equal(pixels(sketched(engine, sketch_weight=0.0)), plain)
    weights = [pixels(sketched(engine, sketch_weight=w)) for w in (0.5, 1.5)]
    assert np.abs(weights[0] - weights[1]).max() > 0 and np.abs(weights[1] - pixels(drawn)).max() > 0
    # outside its start..end window it acts on no step
    assert np.array_equal(pixels(sketched(engine, sketch_start=0.0, sketch_end=0.0)), plain)


def test_dark_on_light_and_light_on_dark_drawings_are_the_same_lines(engine, drawn):
    dark_on_light = pixels(drawn)
    light_on_dark = pixels(sketched(engine, drawing(background=0, ink=255)))
    assert np.array_equal(dark_on_light, light_on_dark)
    on_transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a canvas layer: black ink, no paper
    on_transparent.paste((0, 0, 0, 255), mask=drawing(background=0, ink=255))
    assert np.array_equal(pixels(sketched(engine, on_transparent)), dark_on_light)
    # told never to invert, black lines on white are no lines: a blank sketch
    assert "sketch is blank" in error_of(
        engine,
        task="sketch2img",
        extra={"sketch": drawing(), "sketch_controlnet": EDGES, "sketch_invert": "never"},
    )


def test_a_photo_is_traced_and_merged_with_the_sketch(engine, plain, drawn):
    shapes = np.zeros((96, 96, 3), dtype=np.uint8)  # another size than the output: stretched to it
    shapes[24:72, 24:72] = 255  # a strong edge...
    shapes[6:18, 40:90] = 60  # ...and a weak one, found with low thresholds only
    photo = Image.fromarray(np.maximum(np.asarray(sample_image(96, 96, seed=4)) // 8, shapes))
    traced = pixels(sketched(engine, sketch=..., sketch_photo=photo))
    assert np.abs(traced - pixels(plain)).max() > 0
    # an empty canvas adds nothing to the photo's edges; drawn lines add to them
    blank = Image.new("RGB", (64, 64), "white")
    assert np.array_equal(pixels(sketched(engine, sketch=blank, sketch_photo=photo)), traced)
    both = pixels(sketched(engine, sketch_photo=photo))
    assert np.abs(both - traced).max() > 0 and np.abs(both - pixels(drawn)).max() > 0
    # the thresholds are the photo's: other thresholds, other edges
    assert (
        np.abs(
            pixels(
                sketched(
                    engine, sketch=..., sketch_photo=photo, sketch_low_threshold=20, sketch_high_threshold=40
                )
            )
            - traced
        ).max()
        > 0
    )


def test_every_batch_of_a_request_follows_the_lines(engine, drawn):
    result = run_task(
        engine, "sketch2img", batch_count=2, extra={"sketch": drawing(), "sketch_controlnet": EDGES}
    )
    assert result.seeds == [1, 2]
    second = run_task(engine, "sketch2img", seed=2, extra={"sketch": drawing(), "sketch_controlnet": EDGES})
    assert np.array_equal(np.asarray(result.images[0].image), np.asarray(drawn.images[0].image))
    assert np.array_equal(np.asarray(result.images[1].image), np.asarray(second.images[0].image))


# --- infotext and PNG Info --------------------------------------------------------------------


def test_the_settings_are_written_and_read_back(engine, plain, drawn):
    values = {
        "sketch_controlnet": EDGES,
        "sketch_weight": 0.8,
        "sketch_start": 0.25,
        "sketch_end": 0.9,
        "sketch_low_threshold": 60,
        "sketch_high_threshold": 150,
        "sketch_invert": "always",
    }
    first = run_task(engine, "sketch2img", extra={"sketch": drawing(), **values})
    text = first.infotexts[0]
    for entry in (
        "Sketch ControlNet: tiny-edges",
        "Sketch weight: 0.8",
        "Sketch start: 0.25",
        "Sketch end: 0.9",
        "Sketch low threshold: 60",
        "Sketch high threshold: 150",
        "Sketch invert: always",
    ):
        assert entry in text
    parsed = parse_infotext(text)
    sent, notes = engine.fields.from_infotext(parsed, task="sketch2img")
    assert notes == [] and {name: sent[name] for name in values} == values
    # the values sent back, with the same sketch, make the same image
    own, extra = engine.fields.split(sent)
    again = engine.generate(GenerationRequest(task="sketch2img", **own, extra={"sketch": drawing(), **extra}))
    assert np.array_equal(pixels(again), pixels(first))
    # defaults are not written; other tasks have none of these entries
    assert "Sketch" not in drawn.infotexts[0].replace("Sketch ControlNet: tiny-edges", "")
    assert "Sketch" not in plain.infotexts[0]
    assert not set(engine.fields.from_infotext(parsed, task="txt2img")[0]) & set(plugin.FIELD_NAMES)


def test_a_bad_value_in_an_infotext_is_a_note_not_a_failure(engine):
    parsed = {"Prompt": "a cat", "Sketch weight": "heavy", "Sketch invert": "sideways", "Sketch end": "0.5"}
    sent, notes = engine.fields.from_infotext(parsed, task="sketch2img")
    assert sent["sketch_end"] == 0.5 and "sketch_weight" not in sent and "sketch_invert" not in sent
    assert notes == [
        "Sketch invert 'sideways' is not valid; not sent",
        "Sketch weight 'heavy' is not a number; not sent",
    ]


# --- errors -----------------------------------------------------------------------------------


def test_a_missing_controlnet_says_what_to_install_where(engine, models_dir):
    message = error_of(engine, task="sketch2img", extra={"sketch": drawing()})
    assert message == (
        f"sketch2img needs an edges ControlNet: put one (e.g. control_v11p_sd15_canny) into "
        f"{models_dir / 'controlnet'} and choose it as the Edges ControlNet "
        "(--sketch-controlnet)"
    )
    message = error_of(engine, task="sketch2img", extra={"sketch": drawing(), "sketch_controlnet": "lineart"})
    assert message == (
        f"no ControlNet named 'lineart': put an edges ControlNet folder or .safetensors "
        f"file of that name into {models_dir / 'controlnet'}"
    )


def test_a_controlnet_for_another_kind_of_model_is_refused(engine, models_dir):
    # made for a VAE that shrinks 8 times, like Stable Diffusion's; the tiny model's shrinks 2 times
    folder = save_controlnet(tiny_controlnet(seed=1, downscale=8), models_dir, "for-sd15")
    try:
        message = error_of(
            engine, task="sketch2img", extra={"sketch": drawing(), "sketch_controlnet": "for-sd15"}
        )
    finally:
        shutil.rmtree(folder)
    assert message == (
        "the ControlNet 'for-sd15' is for another kind of model than 'tiny' (it shrinks the "
        "control image 8 times, the model's latents are 2 times smaller); choose one made for "
        "this model's family"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"sketch_weight": 3}, "sketch_weight must be between 0 and 2, got 3"),
        ({"sketch_weight": "strong"}, "sketch_weight must be a number, got 'strong'"),
        ({"sketch_start": -0.5}, "sketch_start must be between 0 and 1, got -0.5"),
        ({"sketch_low_threshold": 0}, "sketch_low_threshold must be between 1 and 255, got 0"),
        ({"sketch_high_threshold": 2.5}, "sketch_high_threshold must be a whole number, got 2.5"),
        (
            {"sketch_invert": "sideways"},
            "unknown sketch_invert 'sideways'; choose one of auto, always, never",
        ),
        ({"sketch_controlnet": 7}, "sketch_controlnet must be text, got 7"),
        (
            {"sketch_low_threshold": 150, "sketch_high_threshold": 100},
            "sketch_low_threshold (150) must not be above sketch_high_threshold (100)",
        ),
        ({"sketch_start": 0.8, "sketch_end": 0.2}, "sketch_start (0.8) must not be after sketch_end (0.2)"),
        # a file name is never opened on the server's side: whoever has the file opens it
        ({"sketch": "/etc/passwd"}, "sketch must be an image, not a file name: open the file first"),
        (
            {"sketch": b"\x89PNG\r\n\x1a\n broken"},
            "sketch must be an image, not a file name: open the file first",
        ),
        ({"sketch_photo": 12}, "sketch_photo must be an image, got int"),
        ({"sketch": ...}, "sketch2img needs lines: draw or upload a sketch, or give a photo to trace"),
        (
            {"sketch": Image.new("L", (64, 64), 255)},
            "the sketch is blank: draw some lines or upload a line drawing",
        ),
        (
            {"sketch": ..., "sketch_photo": Image.new("RGB", (64, 64), "grey")},
            "no lines to follow: the sketch is blank or missing and no edges were found in the photo at thresholds "
            "100/200; lower them or draw lines",
        ),
    ],
)
def test_bad_values_are_refused_with_one_line(engine, extra, expected):
    values = {"sketch": drawing(), "sketch_controlnet": EDGES, **extra}
    message = error_of(engine, task="sketch2img", extra={k: v for k, v in values.items() if v is not ...})
    assert message == expected


def test_a_sketch_on_another_task_is_refused_not_ignored(engine):
    assert error_of(engine, task="txt2img", extra={"sketch": drawing()}) == (
        "sketch is used only by the sketch2img task; choose that task (--task sketch2img)"
    )
    assert error_of(engine, task="img2img", extra={"sketch_photo": sample_image()}) == (
        "sketch_photo is used only by the sketch2img task; choose that task (--task sketch2img)"
    )


def test_the_plugin_imports_only_the_public_api_and_no_gradio():
    import ast
    from pathlib import Path

    package = Path(plugin.__file__).parent
    imported = set()
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module)
    assert {name for name in imported if name.split(".")[0] == "webui"} == {"webui.api"}
    assert not {name for name in imported if name.split(".")[0] in ("gradio", "torch", "diffusers")}
    allowed = {"__future__", "collections", "math", "pathlib", "typing", "numpy", "PIL", "webui"}
    assert {name.split(".")[0] for name in imported} <= allowed
