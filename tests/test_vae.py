"""Separate VAEs per request, and decoding that recovers from NaN instead of giving a black image."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import bundle_from_components, make_sd_components, make_vae

from webui.engine.vae import config_from_ldm, decode_checked, is_automatic
from webui.errors import GenerationError, InvalidRequestError, ModelLoadError
from webui.request import GenerationRequest

RUN = dict(prompt="a red circle", steps=3, seed=11, width=32, height=32, cfg_scale=5.0)


def overflowing_fp16_vae():
    """A tiny VAE whose decoder overflows float16 (activations past 65504) but is fine in float32,
    which is what makes SDXL's VAE give black images in half precision."""
    vae = make_vae(3)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(6e4)
        vae.decoder.conv_in.bias.mul_(6e4)
    return vae.half()


@pytest.fixture
def sd_bundle(tmp_path: Path):
    return bundle_from_components(make_sd_components(tmp_path))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_automatic_names():
    assert is_automatic(None) and is_automatic("Automatic") and is_automatic(" none ") and is_automatic("")
    assert not is_automatic("vae-ft-mse")


def test_decode_checked_retries_in_float32_and_says_so(tmp_path):
    vae = overflowing_fp16_vae()
    components = make_sd_components(tmp_path)
    bundle = bundle_from_components({**components, "vae": vae})
    latents = 4 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def decode(b, z):
        return b.vae.decode(z.to(b.vae.dtype)).sample.float()

    assert not torch.isfinite(decode(bundle, latents)).all()  # the failure is real
    notes: dict = {}
    out = decode_checked(decode, bundle, latents, notes)
    assert torch.isfinite(out).all()
    expected = decode(bundle_from_components({**components, "vae": copy.deepcopy(vae).float()}), latents)
    assert torch.allclose(out, expected, atol=1e-4)
    assert notes == {"VAE decode": "float32 (NaN in float16)"}
    assert bundle.vae.dtype == torch.float16  # the shared VAE is left as it was


def test_nan_in_float32_is_a_clear_error(sd_bundle):
    with torch.no_grad():
        sd_bundle.vae.decoder.conv_in.bias.fill_(float("nan"))
    notes: dict = {}
    with pytest.raises(GenerationError, match="NaN"):
        decode_checked(lambda b, z: b.vae.decode(z).sample, sd_bundle, torch.zeros(1, 4, 8, 8), notes)


def test_engine_never_returns_a_black_image_from_a_nan_vae(engine, tmp_path):
    components = make_sd_components(tmp_path)
    components["vae"] = overflowing_fp16_vae()
    bundle = bundle_from_components(components)
    engine.models.add("tiny-fp16-vae", bundle)
    result = engine.generate(GenerationRequest(model="tiny-fp16-vae", **RUN))
    image = pixels(result.images[0].image)
    assert image.std() > 1.0  # a real picture, not a flat black one
    assert result.images[0].parameters["VAE decode"] == "float32 (NaN in float16)"
    assert "VAE decode: float32 (NaN in float16)" in result.images[0].parameters["infotext"]


# -- swapping the VAE per request ----------------------------------------------------------------


def test_a_swapped_vae_is_used_for_that_request_only(engine, sd_bundle):
    engine.models.add("tiny", sd_bundle)
    other = make_vae(7)
    engine.models.add("other-vae", other, kind="vae")
    before = pixels(engine.generate(GenerationRequest(model="tiny", **RUN)).images[0].image)
    swapped = engine.generate(GenerationRequest(model="tiny", vae="other-vae", **RUN)).images[0]
    after = pixels(engine.generate(GenerationRequest(model="tiny", vae="Automatic", **RUN)).images[0].image)
    assert np.abs(pixels(swapped.image) - before).mean() > 1.0
    np.testing.assert_array_equal(after, before)  # the cached model kept its own VAE
    assert engine.models.get("tiny").vae is sd_bundle.vae
    assert swapped.parameters["VAE"] == "other-vae"
    assert "VAE: other-vae" in swapped.parameters["infotext"]
    assert "VAE" not in engine.generate(GenerationRequest(model="tiny", **RUN)).images[0].parameters


def test_a_swapped_vae_decodes_with_the_models_latent_scaling(engine, sd_bundle):
    """The same VAE weights with another scaling factor in their config decode identically: the
    scaling is the model's (SDXL's 0.13025 stays 0.13025 whatever VAE file is chosen)."""
    engine.models.add("tiny", sd_bundle)
    same = copy.deepcopy(sd_bundle.vae)
    same.register_to_config(scaling_factor=0.5)
    engine.models.add("same-weights", same, kind="vae")
    plain = pixels(engine.generate(GenerationRequest(model="tiny", **RUN)).images[0].image)
    swapped = pixels(
        engine.generate(GenerationRequest(model="tiny", vae="same-weights", **RUN)).images[0].image
    )
    np.testing.assert_array_equal(swapped, plain)


def test_a_vae_with_other_latent_channels_is_refused(engine, sd_bundle):
    from diffusers import AutoencoderKL

    engine.models.add("tiny", sd_bundle)
    engine.models.add(
        "sixteen",
        AutoencoderKL(
            block_out_channels=[32, 64],
            latent_channels=16,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
        ),
        kind="vae",
    )
    with pytest.raises(InvalidRequestError, match="16 latent channels"):
        engine.generate(GenerationRequest(model="tiny", vae="sixteen", **RUN))


def test_vae_must_be_a_name():
    with pytest.raises(InvalidRequestError, match="vae"):
        GenerationRequest(prompt="x", vae=3).validate()


def test_not_a_vae_file_is_refused(tmp_path):
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "x.safetensors"
    )
    from webui.engine.vae import load_vae

    with pytest.raises(ModelLoadError, match="not a VAE"):
        load_vae(tmp_path / "x.safetensors", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="not a VAE"):
        config_from_ldm({"foo": torch.zeros(1)})


# -- VAE files in models/vae ---------------------------------------------------------------------


def write_vae_file(folder: Path, name: str, vae, *, prefix: str = "") -> Path:
    from ldm_format import vae_to_ldm, write_single_file

    folder.mkdir(parents=True, exist_ok=True)
    return write_single_file(folder / f"{name}.safetensors", vae_to_ldm(vae.state_dict(), prefix=prefix))


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_an_original_layout_vae_file_loads_with_equal_weights(tmp_path, prefix):
    from webui.engine.vae import load_vae

    original = make_vae(5)
    path = write_vae_file(tmp_path, "mine", original, prefix=prefix)
    loaded = load_vae(path, device=torch.device("cpu"), dtype=torch.float32)
    expected = original.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert loaded.config.block_out_channels == original.config.block_out_channels


def test_a_vae_from_models_vae_is_chosen_by_name(tmp_path, sd_bundle):
    """models/vae/<name>.safetensors, listed and picked by a request, decodes exactly as the VAE it
    was written from; its hash and name go into the parameters as A1111 writes them."""
    import hashlib

    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager

    models = tmp_path / "models"
    path = write_vae_file(models / "vae", "sharp", make_vae(9))
    engine = Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]),
        models_dir=str(models),
        allow_paths=False,
    )
    assert "sharp" in [entry.name for entry in engine.models.list("vae")]
    engine.models.add("tiny", sd_bundle)
    reference = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    reference.models.add("tiny", sd_bundle)
    reference.models.add("sharp", make_vae(9), kind="vae")
    got = engine.generate(GenerationRequest(model="tiny", vae="sharp", **RUN)).images[0]
    want = reference.generate(GenerationRequest(model="tiny", vae="sharp", **RUN)).images[0]
    np.testing.assert_array_equal(pixels(got.image), pixels(want.image))
    assert got.parameters["VAE"] == "sharp"
    assert got.parameters["VAE hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    with pytest.raises(InvalidRequestError, match="not allowed"):
        engine.generate(GenerationRequest(model="tiny", vae="../vae/sharp", **RUN))
