"""Reading parameters back: EXIF comments of JPEGs, and parsed values to a tab's fields."""

from __future__ import annotations

import pytest

from webui.fields import FieldRegistry
from webui.metadata import parse_infotext
from webui.ui.infotext import fields_from_infotext


@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_pnginfo_reads_the_exif_comment_of_a_jpeg(tmp_path, encoding):
    from PIL import Image

    from webui.ui.tabs.pnginfo import read_parameters

    text = "a lighthouse\nNegative prompt: fog\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 512x512"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode(encoding)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a1111.jpg", exif=exif)
    assert read_parameters(str(tmp_path / "a1111.jpg")) == text
    Image.new("RGB", (32, 32)).save(tmp_path / "plain.jpg")
    assert read_parameters(str(tmp_path / "plain.jpg")) is None


def test_fields_from_infotext():
    registry = FieldRegistry.builtin()
    offered = {
        "sampler": ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras"],
        "model": ["v1-5"],
        "vae": ["Automatic", "sdxl_vae"],
    }
    parsed = parse_infotext(
        "a cat\nNegative prompt: dog\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 6.5, Seed: 12, Size: 512x768, Denoising strength: 0.4, Clip skip: 2, "
        "Eta: 0.5, Model: v1-5"
    )
    assert fields_from_infotext(registry, parsed, offered=offered) == (
        {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "steps": 28,
            "cfg_scale": 6.5,
            "seed": 12,
            "width": 512,
            "height": 768,
            "strength": 0.4,
            "clip_skip": 2,
            "eta": 0.5,
            "sampler": "DPM++ 2M Karras",
            "model": "v1-5",
        },
        [],
    )
    # only the fields asked for, and those of the task
    assert fields_from_infotext(registry, parsed, task="txt2img", names=["steps", "strength"]) == (
        {"steps": 28},
        [],
    )
    # an automatic schedule keeps the sampler's own name; a schedule our list lacks falls back to the name
    assert fields_from_infotext(
        registry, {"Sampler": "Euler a", "Schedule type": "Automatic"}, offered=offered
    ) == ({"sampler": "Euler a"}, [])
    assert fields_from_infotext(
        registry, {"Sampler": "Euler", "Schedule type": "Exponential"}, offered=offered
    ) == ({"sampler": "Euler"}, [])
    # what is not on offer and what is not a number are left out, each with a note
    assert fields_from_infotext(
        registry, {"Sampler": "Restart", "Steps": "many", "Model": "sd-xl", "VAE": "x.pt"}, offered=offered
    ) == (
        {},
        [
            "Steps 'many' is not a number; not sent",
            "model 'sd-xl' is not installed; kept the current model",
            "VAE 'x' is not installed; kept the current VAE",
            "sampler 'Restart' is not available; kept the current sampler",
        ],
    )
    # A1111 names the VAE file; the picker lists it without the extension
    assert fields_from_infotext(registry, {"VAE": "sdxl_vae.safetensors"}, offered=offered) == (
        {"vae": "sdxl_vae"},
        [],
    )
    # out of range is read as written (PNG Info clamps it to the control and says so)
    assert fields_from_infotext(registry, {"Steps": "5000", "Seed": "-7"}) == (
        {"steps": 5000, "seed": -7},
        [],
    )
