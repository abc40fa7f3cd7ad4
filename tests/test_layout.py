"""The default model's prompt reader and the layout it draws: one object in the model's own
caption, two objects in two passes."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training import phrasing, shapes
from training.analyse import analyse
from training.evaluate import pair_facts
from webui.engine.reader import load_reader, read_prompt_states, save_reader
from webui.errors import ModelLoadError
from webui.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "latent-studio-shapes"
RUN = dict(steps=20, sampler="DPM++ 2M Karras", width=64, height=64)


@pytest.fixture(scope="module")
def engine(shapes_engine):
    return shapes_engine


def _states(engine, prompt: str) -> torch.Tensor:
    from webui.engine.text import encode_prompts

    bundle = engine.models.get(None)
    positive, _ = encode_prompts(bundle, [prompt], [""], device="cpu", dtype=torch.float32)
    return positive.embeds


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "held_out"])
def test_the_shipped_reader_reads_one_object_in_any_phrasing(engine, split):
    from training.reader import labels_of

    reader = engine.models.get(None).reader
    assert reader is not None
    rng = random.Random(4242)
    right = 0
    for _ in range(20):
        scene = shapes.random_scene(rng)
        reading = read_prompt_states(reader, _states(engine, phrasing.phrase(scene, rng, split=split)))
        wanted = labels_of(scene)
        right += all(reading[head] == wanted[head] for head in reading.heads_used())
    # measured on 2,000 captions when it was trained: 100 % (training phrasings), 99.6 % (held out)
    assert right >= 19


def _pair_readings(engine, seed: int, count: int, split: str) -> list[tuple[bool, bool]]:
    """(read as two shapes, every answer right) for ``count`` pairs said in ``split``'s phrasings."""
    from training.reader import labels_of

    reader = engine.models.get(None).reader
    rng = random.Random(seed)
    results = []
    for _ in range(count):
        pair = shapes.random_pair(rng)
        reading = read_prompt_states(reader, _states(engine, phrasing.phrase_pair(pair, rng, split=split)))
        wanted = labels_of(pair)
        two = reading.objects == 2
        results.append((two, two and all(reading[head] == wanted[head] for head in reading.heads_used())))
    return results


@pytest.mark.slow
def test_the_shipped_reader_reads_most_held_out_pairs(engine):
    right = sum(ok for _, ok in _pair_readings(engine, 2024, 40, "held_out"))
    # 27 of these 40; 73.7 % of 2,000 when it was trained (53.9 % before its relation forms and fillers)
    assert right >= 25


@pytest.mark.slow
def test_the_shipped_reader_reads_pairs_in_spatial_order(engine):
    readings = _pair_readings(engine, 99, 20, "train")
    assert all(two for two, _ in readings)
    assert sum(ok for _, ok in readings) >= 19
    reader = engine.models.get(None).reader
    # "a X left of a Y" and "a Y right of a X" are one scene: X in slot a (the left one)
    one = read_prompt_states(
        reader, _states(engine, "a red circle to the left of a blue square on a white background")
    )
    other = read_prompt_states(
        reader, _states(engine, "a blue square to the right of a red circle on a white background")
    )
    for reading in (one, other):
        assert (reading["axis"], reading["a_color"], reading["b_color"]) == ("horizontal", "red", "blue")


def _as_it_is(engine, prompt: str, **settings):
    """The prompt used as it is: prompt reading switched off."""
    return engine.generate(GenerationRequest(prompt=prompt, extra={"read_prompt": False}, **settings, **RUN))


@pytest.mark.parametrize("position", list(shapes.POSITIONS))
def test_the_captions_written_from_a_reading_are_the_models_caption_template(position):
    from webui.builtin.layout import captions_of
    from webui.engine.reader import Reading

    labels = {"count": "one", "background": "blue", "position": position}
    labels |= {"a_color": "red", "a_shape": "square", "a_size": "small"}
    reading = Reading(labels, dict.fromkeys(labels, 1.0))
    assert captions_of(reading) == [shapes.Scene("square", "red", "small", position, "blue").caption()]
    pair = Reading(
        {
            **labels,
            "count": "two",
            "axis": "vertical",
            "b_color": "green",
            "b_shape": "circle",
            "b_size": "large",
        },
        {},
    )
    assert captions_of(pair) == [
        shapes.Scene("square", "red", "small", "top", "blue").caption(),
        shapes.Scene("circle", "green", "large", "bottom", "blue").caption(),
    ]


@pytest.mark.slow
def test_a_pair_is_drawn_in_two_passes_and_its_first_half_kept(engine):
    prompt = "a large red circle to the left of a small blue square on a white background"
    result = engine.generate(GenerationRequest(prompt=prompt, seed=3, batch_size=4, **RUN))
    pair = phrasing.read_pair_caption(prompt)
    assert pair is not None
    facts = [pair_facts(pair, item.image) for item in result.images]
    assert sum(f["adherence"] for f in facts) >= 3, facts
    infotext = result.images[0].parameters["infotext"]
    assert "Prompt reading: large red circle left of small blue square on white" in infotext
    # the left half is the first pass exactly: the left shape's caption alone, with the same seeds
    alone = _as_it_is(engine, "a large red circle at the left on a white background", seed=3, batch_size=4)
    for ours, plain in zip(result.images, alone.images, strict=True):
        left = np.asarray(ours.image, dtype=np.int16)[:, :32]
        assert np.abs(left - np.asarray(plain.image, dtype=np.int16)[:, :32]).max() <= 1
        assert analyse(plain.image).color == "red"


@pytest.mark.slow
def test_one_object_is_drawn_from_the_models_own_caption(engine):
    prompt = "blue background, big red circle in the upper left corner"
    read_on = engine.generate(GenerationRequest(prompt=prompt, seed=5, batch_size=2, **RUN))
    assert read_on.images[0].parameters["Prompt reading"] == "large red circle at the top left on blue"
    own = _as_it_is(engine, "a large red circle at the top left on a blue background", seed=5, batch_size=2)
    for ours, theirs in zip(read_on.images, own.images, strict=True):
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
    # switched off, the prompt is used as it is and nothing is recorded
    off = _as_it_is(engine, prompt, seed=5)
    assert "Prompt reading" not in off.images[0].parameters["infotext"]
    assert not np.array_equal(np.asarray(off.images[0].image), np.asarray(own.images[0].image))


@pytest.mark.slow
def test_the_reading_applies_to_plain_text_to_image_only(engine):
    from PIL import Image

    prompt = "a red circle to the left of a blue square on a white background"
    init = Image.new("RGB", (64, 64), (245, 245, 245))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    hires = {"enable_hr": True, "hr_scale": 1.0, "hr_upscaler": "Latent", "hr_denoising_strength": 0.5}
    requests = [
        GenerationRequest(task="img2img", prompt=prompt, init_image=init, strength=0.8, seed=1, **RUN),
        GenerationRequest(task="inpaint", prompt=prompt, init_image=init, mask=mask, seed=1, **RUN),
        GenerationRequest(prompt=prompt, seed=1, extra=hires, **RUN),
        # two chunks: more than the reader's window
        GenerationRequest(prompt=prompt + ", " + "with nothing else around " * 8, seed=1, **RUN),
    ]
    for request in requests:
        result = engine.generate(request)
        assert "Prompt reading" not in result.images[0].parameters["infotext"], request.task


def _reader_folder(tmp_path: Path) -> Path:
    shutil.copytree(MODEL / "reader", tmp_path / "reader")
    return tmp_path / "reader"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["size"].update(width=100_000), "size width=100000"),
        (lambda c: c["size"].update(layers=0), "size layers=0"),
        (lambda c: c["size"].update(colour=3), "size colour=3"),
        (lambda c: c.update(heads={"count": []}), "'heads' must map"),
        (lambda c: c.update(heads={"count": ["x" * 500]}), "'heads' must map"),
        (lambda c: c.update(heads=["count"]), "'heads' must map"),
        (lambda c: c.update(pad="x" * 200_000), "over 100000 characters"),
    ],
)
def test_a_hostile_reader_config_is_refused_before_anything_is_built(tmp_path, change, message):
    folder = _reader_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_reader(folder)


def test_a_broken_reader_fails_the_model_load_with_the_reason(tmp_path):
    from webui.builtin.loaders import _load_reader

    assert _load_reader(tmp_path / "nowhere") is None  # no reader: the model simply has none
    folder = _reader_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="is not a prompt reader"):
        _load_reader(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="is not a prompt reader"):
        _load_reader(folder)


def test_a_saved_reader_loads_back_with_its_labels_and_outputs(tmp_path):
    from webui.engine.reader import PromptReader

    torch.manual_seed(0)
    heads = {"count": ("one", "two"), "a_color": ("red", "blue", "green")}
    reader = PromptReader(heads, features=16, width=8, layers=1, attention_heads=2).eval()
    save_reader(reader, tmp_path / "r", {"held_out": {"all": 0.5}})
    loaded = load_reader(tmp_path / "r")
    assert loaded.labels == heads
    states = torch.randn(1, 5, 16)
    reading = read_prompt_states(loaded, states)
    with torch.no_grad():
        expected = [out.argmax(-1).item() for out in reader.half().float()(states)]
    assert [reading[h] for h in heads] == [heads[h][i] for h, i in zip(heads, expected, strict=True)]
    assert 0 < reading.confidence["a_color"] <= 1


def test_the_readers_own_pair_templates_use_no_held_out_phrasing():
    from training.phrasing import HELD_OUT, TRAIN
    from training.reader import FILLERS, READER_PAIR_TEMPLATES, READER_RELATIONS, reading_texts

    held_out_words = [
        *(form for forms in HELD_OUT.sizes.values() for form in forms),
        *(form for forms in HELD_OUT.relations.values() for form in forms),
        "there is",
        "backdrop",
        "all around",
        "surroundings",
        "is {rel} it",
    ]
    for template in READER_PAIR_TEMPLATES:
        assert template not in HELD_OUT.pair_templates and template not in TRAIN.pair_templates
        assert not [word for word in held_out_words if word in template], template

    # nor, word by word, in its own relation forms and filler words: no word that only the held-out
    # phrasings use ("further", "than", "higher", "up", "down", "underneath", "there", ...)
    def words(value) -> set[str]:
        return set(re.findall(r"[a-z-]+", str(value)))

    held_out_only = words(dataclasses.astuple(HELD_OUT)) - words(dataclasses.astuple(TRAIN))
    assert {"further", "than", "higher", "up", "down", "underneath", "there"} <= held_out_only
    assert not words(READER_RELATIONS) & held_out_only
    assert not set(FILLERS) & held_out_only
    assert not [form for forms in READER_RELATIONS.values() for form in forms if form in str(TRAIN.relations)]
    # the reader's training captions do use them
    texts, _ = reading_texts(400, random.Random(1), "train")
    used = [t for t in texts if " it" in t or "that shape" in t]
    assert len(used) >= 20
    assert not [t for t in texts for word in held_out_words[:-1] if word in t]


def test_the_train_command_trains_the_reader_after_the_export(tmp_path):
    from test_default_model import tiny_config

    from training.train import TrainConfig, train
    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager

    config = tiny_config(TrainConfig, scenes=4, vae_steps=1, steps=1, reader_texts=24, reader_steps=3)
    out = train(tmp_path / "model", tmp_path / "ckpt", config, device="cpu")
    assert out is not None
    reader_config = json.loads((out / "reader" / "config.json").read_text())
    assert reader_config["scores"]["recipe"] == {"seed": 0, "texts": 24, "steps": 3, "batch": 128, "lr": 1e-3}
    assert 0 <= reader_config["scores"]["held_out"]["all"] <= 1
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert [e for e in log if e.get("event") == "reader"]
    # the exported folder loads with its reader, and text-to-image records what it read
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    bundle = engine.models.get(str(out))
    assert bundle.reader is not None and set(bundle.reader.labels) == set(reader_config["heads"])
    result = engine.generate(GenerationRequest(model=str(out), prompt="a red circle", steps=2, seed=0))
    assert result.images[0].image.size == (64, 64)
