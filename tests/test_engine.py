"""Engine behaviour beyond parity: seeds, long prompts, inpainting options, combined conditionings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import bundle_from, make_controlnet, sd_components
from fixtures_models import random_image, rect_mask, seg_map
from PIL import Image

from webui.builtin.masked_image import crop_region, fill_masked
from webui.request import GenerationRequest

BASE = dict(prompt="a green triangle", steps=3, seed=100, width=64, height=64, sampler="Euler a")


@pytest.fixture(scope="module")
def bundle(controlnet_bundle):
    """This module's tests run on the tiny model with its segmentation ControlNet (conftest.py)."""
    return controlnet_bundle


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory):
    return bundle_from(sd_components(tmp_path_factory.mktemp("tok9"), in_channels=9))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run(engine, bundle, **kwargs):
    return engine.generate(GenerationRequest(**{**BASE, **kwargs}), bundle=bundle)


def test_every_image_of_a_batch_reproduces_alone(engine, bundle):
    batch = run(engine, bundle, batch_size=2, batch_count=2)
    assert batch.seeds == [100, 101, 102, 103]
    alone = run(engine, bundle, seed=102)
    assert np.array_equal(arr(batch.images[2].image), arr(alone.images[0].image))
    assert "Seed: 102," in batch.infotexts[2]


def test_random_seed_is_recorded(engine, bundle):
    result = run(engine, bundle, seed=-1)
    seed = result.seeds[0]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in result.infotexts[0]
    again = run(engine, bundle, seed=seed)
    assert np.array_equal(arr(result.images[0].image), arr(again.images[0].image))


def test_long_prompt_is_not_truncated(engine, bundle):
    words = " ".join(["red"] * 70)
    short = run(engine, bundle, prompt=words)
    longer = run(engine, bundle, prompt=words + " " + " ".join(["blue"] * 40))
    assert np.abs(arr(short.images[0].image) - arr(longer.images[0].image)).max() > 0


def test_emphasis_changes_the_image(engine, bundle):
    plain = run(engine, bundle, prompt="a cat on a mat")
    weighted = run(engine, bundle, prompt="a (cat:1.6) on a mat")
    assert np.abs(arr(plain.images[0].image) - arr(weighted.images[0].image)).max() > 0


@pytest.mark.parametrize("which", ["bundle", "inpaint_bundle"])
def test_inpainting_keeps_unmasked_pixels_exactly(engine, request, which):
    model = request.getfixturevalue(which)
    init, mask = random_image(8), rect_mask()
    result = run(engine, model, task="inpaint", init_image=init, mask=mask, mask_blur=0, strength=1.0)
    out, original = arr(result.images[0].image), arr(init)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).mean() > 5  # the masked area was repainted
    assert "Mask blur: 0" in result.infotexts[0]


def test_mask_blur_softens_the_seam_and_invert_swaps(engine, inpaint_bundle):
    init, mask = random_image(8), rect_mask()
    sharp = arr(
        run(engine, inpaint_bundle, task="inpaint", init_image=init, mask=mask, mask_blur=0).images[0].image
    )
    soft = arr(
        run(engine, inpaint_bundle, task="inpaint", init_image=init, mask=mask, mask_blur=4).images[0].image
    )
    # just outside the rectangle the blurred composite mixes in the new content
    assert np.array_equal(sharp[16:48, 41], arr(init)[16:48, 41])
    assert not np.array_equal(soft[16:48, 41], arr(init)[16:48, 41])
    inverted = run(
        engine, inpaint_bundle, task="inpaint", init_image=init, mask=mask, mask_blur=0, invert_mask=True
    )
    out = arr(inverted.images[0].image)
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[inside], arr(init)[inside])
    assert "Mask mode: Inpaint not masked" in inverted.infotexts[0]


@pytest.mark.parametrize("mode", ["fill", "latent noise", "latent nothing"])
def test_masked_content_modes_change_the_start(engine, inpaint_bundle, mode):
    init, mask = random_image(9), rect_mask()
    kwargs = dict(task="inpaint", init_image=init, mask=mask, mask_blur=0, strength=0.6, steps=5)
    original = arr(run(engine, inpaint_bundle, **kwargs).images[0].image)
    changed = run(engine, inpaint_bundle, masked_content=mode, **kwargs)
    inside = np.asarray(mask) > 0
    assert np.abs(arr(changed.images[0].image)[inside] - original[inside]).max() > 0
    assert f"Masked content: {mode}" in changed.infotexts[0]


def test_fill_replaces_the_masked_area_with_surrounding_colours():
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.paste((0, 0, 255), (20, 20, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (18, 18, 42, 42))
    filled = arr(fill_masked(image, mask))
    assert np.abs(filled[30, 30] - np.array([200, 30, 30])).max() <= 2
    assert np.array_equal(filled[5, 5], [200, 30, 30])


def test_crop_region_pads_and_keeps_the_aspect_ratio():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (90, 40, 110, 60))
    assert crop_region(mask, 10, 1.0) == (80, 30, 120, 70)
    left, top, right, bottom = crop_region(mask, 10, 2.0)
    assert (right - left) == 2 * (bottom - top) and left <= 80 and right >= 120 and bottom - top == 40
    assert crop_region(Image.new("L", (10, 10), 0), 4, 1.0) is None


def test_only_masked_inpaints_the_crop_and_pastes_it_back(engine, inpaint_bundle):
    init = random_image(10, size=128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (80, 80, 100, 100))
    result = run(
        engine,
        inpaint_bundle,
        task="inpaint",
        init_image=init,
        mask=mask,
        mask_blur=0,
        only_masked=True,
        only_masked_padding=8,
        width=64,
        height=64,
    )
    out = arr(result.images[0].image)
    assert out.shape == (128, 128, 3)  # the original size, not the 64x64 working size
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], arr(init)[outside])
    assert np.abs(out[80:100, 80:100] - arr(init)[80:100, 80:100]).mean() > 5
    assert "Inpaint area: Only masked" in result.infotexts[0]


def test_inpainting_guided_by_a_segmentation_map_in_one_request(engine, bundle):
    init, mask = random_image(11), rect_mask()
    kwargs = dict(task="inpaint", init_image=init, mask=mask, mask_blur=0)
    plain = run(engine, bundle, **kwargs)
    guided = run(engine, bundle, seg_map=seg_map(), **kwargs)
    inside = np.asarray(mask) > 0
    assert np.abs(arr(guided.images[0].image)[inside] - arr(plain.images[0].image)[inside]).max() > 0
    assert np.array_equal(arr(guided.images[0].image)[~inside], arr(init)[~inside])
    assert "ControlNet 0: " in guided.infotexts[0] and "Mask blur: 0" in guided.infotexts[0]


def test_img2img_closeness_falls_as_strength_rises(engine, bundle):
    # measured in latent space: a random-weight VAE cannot reconstruct pixels, its latents are exact
    import torch

    from webui.images import image_to_tensor

    init = random_image(12)
    init_latents = engine.encode_images(bundle, image_to_tensor(init), [torch.Generator().manual_seed(100)])
    distances = []
    for strength in (0.1, 0.3, 0.5, 0.7, 1.0):
        final = {}
        request = GenerationRequest(
            **{**BASE, "task": "img2img", "init_image": init, "strength": strength, "steps": 10}
        )
        engine.generate(
            request, bundle=bundle, callback=lambda step, seen=final: seen.update(latents=step.latents)
        )
        distances.append(float((final["latents"] - init_latents).abs().mean()))
    assert distances == sorted(distances) and distances[0] < 0.2 * distances[-1]


def test_seg2img_without_a_controlnet_says_what_to_do(engine, components):
    from webui.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="segmentation ControlNet"):
        run(engine, bundle_from(components), task="seg2img", seg_map=seg_map())


def test_a_controlnet_with_its_own_palette(engine, components, tmp_path):
    from webui.engine.segmap import Palette

    palette = Palette(
        "shapes", ("background", "circle", "square"), np.array([[0, 0, 0], [250, 10, 10], [10, 10, 250]])
    )
    folder = tmp_path / "shapes-controlnet"
    make_controlnet(components["unet"], seed=3).save_pretrained(folder, safe_serialization=True)
    palette.to_json(folder / "palette.json")
    controlnet = engine.models.get_controlnet(str(folder))
    assert controlnet.seg_palette == palette

    exact = np.zeros((64, 64), dtype=np.int64)
    exact[10:30, 10:30], exact[35:60, 30:60] = 1, 2
    exact_map = Image.fromarray(palette.colors[exact])
    near_map = Image.fromarray(np.clip(palette.colors[exact].astype(int) + 12, 0, 255).astype(np.uint8))
    kwargs = dict(task="seg2img", controlnet=str(folder))
    a = run(engine, bundle_from(components), seg_map=exact_map, **kwargs)
    b = run(engine, bundle_from(components), seg_map=near_map, **kwargs)
    assert np.array_equal(arr(a.images[0].image), arr(b.images[0].image))  # near colours snap to the classes
    assert f"Model: {folder}" in a.infotexts[0]


def test_size_follows_the_init_image_rounded_down(engine, bundle):
    init = random_image(13, size=70)
    result = engine.generate(
        GenerationRequest(prompt="x", steps=2, seed=1, task="img2img", init_image=init), bundle=bundle
    )
    assert result.images[0].image.size == (64, 64)
    assert "Size: 64x64" in result.infotexts[0]


def test_encoding_inverts_decoding_with_latent_statistics(bundle):
    """VAEs whose config carries latents_mean/latents_std (some SDXL-family VAEs) are normalised
    the same way in both directions, so img2img starts from the right latents."""
    from webui.engine.pipeline import Engine as EngineClass

    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    channels = bundle.latent_channels
    bundle.vae.register_to_config(latents_mean=[0.3] * channels, latents_std=[2.0] * channels)
    try:
        latents = EngineClass.encode_images(bundle, image, [torch.Generator().manual_seed(1)])
        raw = bundle.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(1))
        expected = (raw - 0.3) * bundle.vae.config.scaling_factor / 2.0
        assert torch.allclose(latents.float(), expected, atol=1e-5)
        decoded = EngineClass.decode_latents(bundle, latents)
        assert torch.allclose(decoded, bundle.vae.decode(raw).sample.float(), atol=1e-4)
    finally:
        bundle.vae.register_to_config(latents_mean=None, latents_std=None)


def test_guidance_follows_the_model_when_the_request_names_none(engine, components):
    from webui.engine.bundle import model_default_cfg

    plain = bundle_from(components)
    guided = bundle_from(components)
    guided.config = {"defaults": {"cfg_scale": 3.5}}
    request = GenerationRequest(**{**BASE, "cfg_scale": None})
    assert "CFG scale: 7," in engine.generate(request, bundle=plain).infotexts[0]
    chosen = engine.generate(request, bundle=guided).images[0]
    assert "CFG scale: 3.5," in chosen.parameters["infotext"]
    explicit = engine.generate(request.replace(cfg_scale=3.5), bundle=plain).images[0]
    assert np.array_equal(arr(chosen.image), arr(explicit.image))  # the same as asking for 3.5
    assert "CFG scale: 9," in engine.generate(request.replace(cfg_scale=9.0), bundle=guided).infotexts[0]
    for junk in (
        {"defaults": {"cfg_scale": "high"}},
        {"defaults": {"cfg_scale": -1}},
        {"defaults": 3},
        {"defaults": {"cfg_scale": True}},
        {},
    ):
        assert model_default_cfg(junk) == 7.0
