"""Tests of the A1111-compatible infotext writer, parser and PNG reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.metadata import format_infotext, format_value, parse_infotext, read_png_parameters

PARAMS: dict[str, object] = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1234567890,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Denoising strength": 0.75,
    "Mask blur": 4,
}

A1111_TEXT = (
    "masterpiece, best quality, (a red fox:1.2) sitting in the snow,\n"
    "winter forest, <lora:fluffy:0.8>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    'Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "a: 1234, b: 5678", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def test_format_layout() -> None:
    text = format_infotext("a cat", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7"


def test_format_keeps_dict_order_and_skips_none() -> None:
    params = {"Seed": 5, "Steps": 10, "Model hash": None, "CFG scale": 7.5, "Size": "64x64"}
    assert format_infotext("p", "", params) == "p\nSeed: 5, Steps: 10, CFG scale: 7.5, Size: 64x64"


def test_empty_negative_prompt_omits_line() -> None:
    text = format_infotext("a dog", "", PARAMS)
    assert "Negative prompt" not in text
    assert text.splitlines()[0] == "a dog"
    assert len(text.splitlines()) == 2
    assert parse_infotext(text)["Negative prompt"] == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7.0, "7"), (0.75, "0.75"), (20, "20"), (1e-05, "1e-05"), (True, "True"), ("Euler a", "Euler a")],
)
def test_format_value(value: object, expected: str) -> None:
    assert format_value(value) == expected


def test_quoting() -> None:
    params = {
        "Steps": 20,
        "Lora hashes": "a: 1234, b: 5678",
        "Note": 'say "hi"',
        "Plain": "no specials here",
        "Multi": "one\ntwo",
    }
    line = format_infotext("p", "", params).splitlines()[-1]
    assert 'Lora hashes: "a: 1234, b: 5678"' in line
    assert r'Note: "say \"hi\""' in line
    assert "Plain: no specials here" in line
    assert r'Multi: "one\ntwo"' in line
    assert "\n" not in line
    parsed = parse_infotext(format_infotext("p", "", params))
    for key, value in params.items():
        assert parsed[key] == str(value)


def test_round_trip() -> None:
    text = format_infotext("a photo of a cat", "ugly, blurry", PARAMS)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a photo of a cat"
    assert parsed["Negative prompt"] == "ugly, blurry"
    assert parsed["Steps"] == "20"
    assert parsed["CFG scale"] == "7"
    assert parsed["Denoising strength"] == "0.75"
    assert parsed["Seed"] == "1234567890"
    assert parsed["Size"] == "512x768"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert list(parsed)[:2] == ["Prompt", "Negative prompt"]
    assert format_infotext(parsed["Prompt"], parsed["Negative prompt"], _params_only(parsed)) == text


def _params_only(parsed: dict[str, str]) -> dict[str, object]:
    skip = {"Prompt", "Negative prompt", "Size-1", "Size-2"}
    return {k: v for k, v in parsed.items() if k not in skip}


def test_multiline_prompts_round_trip() -> None:
    prompt = "line one,\nline two with (emphasis:1.1)\n\nline four"
    negative = "bad hands,\nextra fingers"
    parsed = parse_infotext(format_infotext(prompt, negative, PARAMS))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Mask blur"] == "4"


def test_parse_a1111_text() -> None:
    parsed = parse_infotext(A1111_TEXT)
    assert parsed["Prompt"] == (
        "masterpiece, best quality, (a red fox:1.2) sitting in the snow,\nwinter forest, <lora:fluffy:0.8>"
    )
    assert parsed["Negative prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    assert parsed["Steps"] == "28"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Seed"] == "3141592653"
    assert parsed["Size"] == "512x768"
    assert parsed["Size-1"] == "512"
    assert parsed["Size-2"] == "768"
    assert parsed["Model hash"] == "6ce0161689"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Denoising strength"] == "0.45"
    assert parsed["Clip skip"] == "2"
    assert parsed["Hires upscaler"] == "Latent"
    assert parsed["Lora hashes"] == "a: 1234, b: 5678"
    assert parsed["TI hashes"] == "easynegative: c74b4e810b03"
    assert parsed["Version"] == "v1.10.1"
    assert "a" not in parsed and "b" not in parsed


def test_parse_crlf_and_surrounding_whitespace() -> None:
    text = "\n  a cat  \r\nNegative prompt:  dog \r\nSteps: 20, Sampler: Euler, Seed: 1\r\n\n"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat"
    assert parsed["Negative prompt"] == "dog"
    assert parsed["Seed"] == "1"


def test_last_line_needs_three_pairs() -> None:
    parsed = parse_infotext("a portrait\nstyle: baroque, mood: calm")
    assert parsed["Prompt"] == "a portrait\nstyle: baroque, mood: calm"
    assert "style" not in parsed
    assert parsed["Negative prompt"] == ""


def test_prompt_only() -> None:
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_negative_without_positive() -> None:
    text = format_infotext("", "blurry", PARAMS)
    assert text.startswith("Negative prompt: blurry\n")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == ""
    assert parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "20"


def test_unicode_prompt_round_trip() -> None:
    text = format_infotext("猫, café — ☕", "", PARAMS)
    assert parse_infotext(text)["Prompt"] == "猫, café — ☕"


@pytest.mark.parametrize("key", ["", "x", "Bad, key", "Bad: key", "New\nline"])
def test_invalid_keys_rejected(key: str) -> None:
    with pytest.raises(ValueError):
        format_infotext("p", "", {key: 1})


def test_read_png_parameters_text_and_itxt(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))

    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    latin = tmp_path / "latin.png"
    image.save(latin, pnginfo=info)
    assert read_png_parameters(latin) == A1111_TEXT
    assert read_png_parameters(str(latin)) == A1111_TEXT

    info = PngInfo()
    info.add_itxt("parameters", "猫\nSteps: 1, Seed: 2, CFG scale: 3")
    wide = tmp_path / "wide.png"
    image.save(wide, pnginfo=info)
    assert read_png_parameters(wide) == "猫\nSteps: 1, Seed: 2, CFG scale: 3"
    with Image.open(wide) as opened:
        value = read_png_parameters(opened)
    assert type(value) is str
    assert value == "猫\nSteps: 1, Seed: 2, CFG scale: 3"


def test_read_png_parameters_missing(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4))
    plain = tmp_path / "plain.png"
    image.save(plain)
    assert read_png_parameters(plain) is None
    other = PngInfo()
    other.add_text("Comment", "hello")
    commented = tmp_path / "comment.png"
    image.save(commented, pnginfo=other)
    assert read_png_parameters(commented) is None
    jpeg = tmp_path / "photo.jpg"
    image.save(jpeg)
    assert read_png_parameters(jpeg) is None
