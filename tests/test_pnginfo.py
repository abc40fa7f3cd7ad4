"""Reading parameters back: EXIF comments of JPEGs, and parsed values to a tab's fields."""

from __future__ import annotations

import pytest

from webui.metadata import parse_infotext
from webui.ui.infotext import fields_from_parameters


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


def test_fields_from_parameters():
    samplers = ["Euler a", "DPM++ 2M", "DPM++ 2M Karras"]
    parsed = parse_infotext("a cat\nNegative prompt: dog\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
                            "CFG scale: 6.5, Seed: 12, Size: 512x768, Denoising strength: 0.4, Clip skip: 2, "
                            "Model: v1-5")
    assert fields_from_parameters(parsed, samplers) == {
        "prompt": "a cat", "negative_prompt": "dog", "steps": 28, "cfg_scale": 6.5, "seed": 12, "width": 512,
        "height": 768, "strength": 0.4, "clip_skip": 2, "sampler": "DPM++ 2M Karras", "model": "v1-5"}
    # an automatic schedule keeps the sampler's own name; an unknown sampler and a bad number are left out
    assert fields_from_parameters({"Sampler": "Euler a", "Schedule type": "Automatic"}, samplers) == {
        "sampler": "Euler a"}
    assert fields_from_parameters({"Sampler": "Restart", "Steps": "many"}, samplers) == {}
    # A1111 names the VAE file; the picker lists it without the extension
    assert fields_from_parameters({"VAE": "sdxl_vae.safetensors"}) == {"vae": "sdxl_vae"}
