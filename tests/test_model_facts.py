"""One source for each fact: the latent codec, the model-info reader, the palette lookup, the
memory release, and the training code kept out of the runtime package.

Each fact used to be computed in several places that could (and did) disagree: a model's native
size (the web UI said 512 for an SD 2.x 768-v model that the engine ran at 768), the latent
scaling (engine, previews), the float32 VAE copy (previews, NaN recovery), the palette lookup.
These tests pin the one place and check that the engine, the UI and the loaders agree on it.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from components import SD_SCHEDULER, sd_components, sdxl_components
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from ldm_format import tiny_components, to_ldm, write_single_file
from tiny import bundle_from_components, make_sd_components, make_vae

from webui.engine import codec
from webui.engine.model_info import ModelInfo, native_size, read_model_info
from webui.engine.pipeline import Engine
from webui.engine.segmap import ADE20K, Palette, find_palette
from webui.errors import ModelLoadError
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest
from webui.ui.service import StudioService

ROOT = Path(__file__).resolve().parent.parent
TWO = Palette("two", ("sky", "sea"), [[0, 0, 255], [0, 128, 255]])


def make_engine(models_dir: Path | None = None) -> Engine:
    return Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]),
        models_dir=str(models_dir) if models_dir else None,
    )


# -- the latent codec ----------------------------------------------------------------------------------

# the published settings: SD 1.x/2.x, SDXL, an SD3-style VAE with a shift, one with channel statistics
SCALINGS = {
    "sd1": dict(scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None),
    "sdxl": dict(scaling_factor=0.13025, shift_factor=None, latents_mean=None, latents_std=None),
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, latents_mean=None, latents_std=None),
    "stats": dict(
        scaling_factor=0.5,
        shift_factor=None,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[2.0, 0.5, 1.0, 4.0],
    ),
}


def expected_scaled(raw: torch.Tensor, scaling: dict) -> torch.Tensor:
    """What each family's reference pipeline multiplies, written out per family."""
    if scaling["latents_mean"] is not None:
        mean = torch.tensor(scaling["latents_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(scaling["latents_std"]).view(1, -1, 1, 1)
        return (raw - mean) * scaling["scaling_factor"] / std
    return (raw - (scaling["shift_factor"] or 0.0)) * scaling["scaling_factor"]


@pytest.mark.parametrize("family", SCALINGS)
def test_codec_scales_each_family_as_its_reference(family):
    scaling = SCALINGS[family]
    raw = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    scaled = codec.scale_latents(raw, scaling)
    assert torch.allclose(scaled, expected_scaled(raw, scaling), atol=1e-6)
    assert torch.allclose(codec.unscale_latents(scaled, scaling), raw, atol=1e-5)
    if family == "sd1":
        assert torch.allclose(
            codec.scale_latents(torch.ones(1, 4, 1, 1), scaling), torch.full((1, 4, 1, 1), 0.18215)
        )
    if family == "sd3":  # the shift comes off before the scaling
        assert torch.allclose(
            codec.scale_latents(torch.full((1, 4, 1, 1), 0.0609), scaling), torch.zeros(1, 4, 1, 1)
        )


@pytest.mark.parametrize("family", SCALINGS)
def test_engine_and_previews_read_the_scaling_from_the_vae_config(family, tmp_path):
    """The VAE config's entries are what the engine encodes with and what the previews fit with."""
    vae = make_vae(0)
    vae.register_to_config(**SCALINGS[family])
    assert codec.latent_scaling(vae.config) == SCALINGS[family]
    bundle = bundle_from_components({**make_sd_components(tmp_path), "vae": vae})
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = Engine.encode_images(bundle, image, [torch.Generator().manual_seed(2)])
    with torch.no_grad():
        raw = vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(2))
        decoded = vae.decode(raw).sample
    assert torch.allclose(latents, expected_scaled(raw, SCALINGS[family]), atol=1e-5)
    assert torch.allclose(Engine.decode_latents(bundle, latents), decoded, atol=1e-4)


def test_a_swapped_vae_keeps_the_models_scaling(tmp_path):
    bundle = bundle_from_components(make_sd_components(tmp_path))
    other = make_vae(5)
    other.register_to_config(scaling_factor=0.5)
    swapped = copy.copy(bundle)
    swapped.vae, swapped.latent_scaling = other, codec.latent_scaling(bundle.vae.config)
    assert codec.model_scaling(swapped)["scaling_factor"] == bundle.vae.config.scaling_factor == 0.18215
    assert codec.model_scaling(bundle) == codec.latent_scaling(bundle.vae.config)


def test_float32_vae_copies_only_when_needed_and_leaves_the_original():
    plain = make_vae(0)
    assert codec.float32_vae(plain, "cpu") is plain  # float32 on the CPU already
    half = make_vae(0).half()
    half.enable_tiling()
    full = codec.float32_vae(half, torch.device("cpu"))
    assert full is not half and full.dtype == torch.float32 and full.use_tiling
    assert all(p.dtype == torch.float16 for p in half.parameters())  # the shared VAE is untouched
    assert torch.equal(full.decoder.conv_in.weight, half.decoder.conv_in.weight.float())
    encoder = codec.float32_vae(half, "cpu", encoder_only=True)
    assert torch.equal(encoder.encoder.conv_in.weight, half.encoder.conv_in.weight.float())
    assert encoder.decoder.conv_in.weight.is_meta and not encoder.use_tiling  # the decoder half is not copied
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(
            encoder.encode(image).latent_dist.mean, plain.encode(image).latent_dist.mean, atol=1e-2
        )


def test_engine_previews_and_nan_recovery_share_the_codec():
    """No second copy of the scaling or the float32 copy is left in the modules that use them."""
    for module in ("pipeline", "preview", "vae"):
        source = (ROOT / "webui" / "engine" / f"{module}.py").read_text(encoding="utf-8")
        assert 'scaling_factor"]' not in source and "from_config(vae.config)" not in source, module
        assert "shift_factor" not in source.split('"""', 2)[2], module  # only the docstring may name it


# -- native size, guidance and the rest of a model's facts ---------------------------------------------


def save_folder(
    folder: Path,
    tokenizer: Path,
    *,
    sample_size: int,
    levels: int,
    prediction: str = "epsilon",
    xl: bool = False,
) -> Path:
    """A tiny diffusers folder whose UNet ``sample_size`` and VAE depth are a real family's."""
    components = sdxl_components(tokenizer) if xl else sd_components(tokenizer)
    components["unet"].register_to_config(sample_size=sample_size)
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL(
        block_out_channels=[32] * levels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    if not xl:
        components["scheduler"] = PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipeline(**components).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize(
    ("name", "sample_size", "levels", "prediction", "xl", "size"),
    [
        ("sd1", 64, 4, "epsilon", False, 512),
        ("sd2-768-v", 96, 4, "v_prediction", False, 768),  # the UI used to say 512 here
        ("sdxl", 128, 4, "epsilon", True, 1024),
        ("tiny", 32, 2, "epsilon", False, 64),
    ],
)
def test_native_size_is_the_same_for_engine_ui_and_reader(
    tmp_path, name, sample_size, levels, prediction, xl, size
):
    models = tmp_path / "models"
    folder = save_folder(
        models / name,
        tmp_path / "tokenizer",
        sample_size=sample_size,
        levels=levels,
        prediction=prediction,
        xl=xl,
    )
    engine = make_engine(models)
    bundle = engine.models.get(name)
    service = StudioService(engine, tmp_path / "outputs")
    assert (
        bundle.default_size
        == service.model_info(name).default_size
        == read_model_info(folder).default_size
        == size
    )
    assert bundle.default_cfg_scale == service.model_info(name).cfg_scale == 7.0


def test_a_declared_size_and_guidance_win_everywhere(tmp_path):
    models = tmp_path / "models"
    folder = save_folder(models / "own", tmp_path / "tokenizer", sample_size=96, levels=4)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        default_size=640,
        defaults={"cfg_scale": 3.5},
        ui={"examples": ["a cat"]},
        vocabulary={"animals": ["cat", "dog"]},
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    engine = make_engine(models)
    bundle, info = engine.models.get("own"), StudioService(engine, tmp_path / "out").model_info("own")
    assert (
        (bundle.default_size, bundle.default_cfg_scale) == (info.default_size, info.cfg_scale) == (640, 3.5)
    )
    assert info.examples == ["a cat"] and info.vocabulary == {"animals": ["cat", "dog"]}
    result = engine.generate(GenerationRequest(model="own", prompt="a cat", steps=1, seed=1, sampler="Euler"))
    assert result.images[0].image.size == (640, 640) and "CFG scale: 3.5" in result.infotexts[0]


def test_a_single_file_sd2_v_checkpoint_reads_768_in_ui_and_engine(tmp_path):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    path = write_single_file(
        models / "checkpoints" / "sd21-v.safetensors", to_ldm("sd2-v", tiny_components("sd2-v"))
    )
    engine = make_engine(models)
    info = StudioService(engine, tmp_path / "out").model_info("sd21-v")
    assert (
        info.default_size
        == engine.models.get("sd21-v").default_size
        == read_model_info(path).default_size
        == 768
    )


@pytest.mark.parametrize(
    ("settings", "kwargs", "size"),
    [
        ({}, dict(sample_size=64, scale_factor=8), 512),
        ({}, dict(sample_size=96, scale_factor=8), 768),
        ({}, dict(sample_size=[96, 128], scale_factor=8), 1024),  # a (height, width) pair: the larger side
        ({"default_size": 64}, dict(sample_size=96, scale_factor=8), 64),
        ({"default_size": "768"}, {}, 768),
        ({"default_size": "big"}, dict(sample_size=96, scale_factor=8), 768),  # nonsense is not a size
        ({"default_size": -5}, {}, 512),
        ({}, dict(two_text_encoders=True), 1024),
        ({}, {}, 512),
    ],
)
def test_native_size_rules(settings, kwargs, size):
    assert native_size(settings, **kwargs) == size


def test_broken_model_files_give_defaults_not_errors(tmp_path, caplog):
    folder = tmp_path / "broken"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{not json")
    (folder / "unet" / "config.json").write_bytes(b"\xff\xfe")
    (folder / "controlnet").mkdir()
    (folder / "controlnet" / "palette.json").write_text('{"colors": "red"}')
    with caplog.at_level(logging.WARNING):
        info = read_model_info(folder, "broken")
    assert info == ModelInfo(name="broken")  # every fact at its default, the palette ADE20K's
    assert "invalid palette" in caplog.text
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    assert read_model_info(tmp_path / "junk.safetensors").default_size == 512
    assert read_model_info(tmp_path / "missing").default_size == 512
    assert read_model_info(None, "x") == ModelInfo(name="x")


# -- the palette lookup ------------------------------------------------------------------------------


def test_palette_lookup_for_folders_and_files(tmp_path):
    folder = tmp_path / "seg-net"
    folder.mkdir()
    assert find_palette(folder) is ADE20K and find_palette(folder, default=None) is None
    TWO.to_json(folder / "palette.json")
    assert find_palette(folder) == TWO
    weights = tmp_path / "my_seg.safetensors"
    weights.write_bytes(b"")
    assert find_palette(weights) is ADE20K
    TWO.to_json(tmp_path / "my_seg.palette.json")
    assert find_palette(weights) == TWO
    (folder / "palette.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="invalid palette"):
        find_palette(folder)


def test_the_ui_and_the_loaders_find_the_same_palette(tmp_path, tiny_model_dir):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "controlnet", models / "controlnet" / "seg-net")
    shutil.copytree(tiny_model_dir, models / "tiny-sd")
    for where in (models / "controlnet" / "seg-net", models / "tiny-sd" / "controlnet"):
        TWO.to_json(where / "palette.json")
    engine = make_engine(models)
    service = StudioService(engine, tmp_path / "out")
    assert service.controlnet_palette("seg-net") == engine.models.get_controlnet("seg-net").seg_palette == TWO
    assert (
        service.model_info("tiny-sd").palette
        == engine.models.get("tiny-sd").controlnets["seg"].seg_palette
        == TWO
    )
    (models / "controlnet" / "seg-net" / "palette.json").write_text("nonsense")
    assert service.controlnet_palette("seg-net") is ADE20K  # the UI logs it and keeps working
    with pytest.raises(ModelLoadError, match="invalid palette"):
        make_engine(models).models.get_controlnet("seg-net")  # loading the model says what is wrong


# -- memory, locks ------------------------------------------------------------------------------------


def test_one_release_memory(monkeypatch):
    """The stream gives memory back with the engine's own function after a failed generation."""
    from webui.engine import memory, stream

    released = []
    monkeypatch.setattr(memory, "release_memory", lambda device=None: released.append(device))

    class Failing:
        def generate(self, request, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(stream.stream(Failing(), GenerationRequest(prompt="x")))
    assert len(released) == 1
    sources = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "webui").rglob("*.py")}
    assert [name for name, text in sources.items() if "empty_cache()" in text] == ["memory.py"]


def test_the_model_lock_lives_with_the_model_cache():
    from webui.engine import lora, models, text

    assert lora.bundle_lock is models.model_lock
    assert "bundle_lock" not in (ROOT / "webui" / "engine" / "text.py").read_text(encoding="utf-8")
    assert text.model_lock is models.model_lock


# -- the training code is not part of the app ----------------------------------------------------------


def test_training_lives_beside_the_package():
    assert (ROOT / "training" / "train.py").is_file() and not (ROOT / "webui" / "training").exists()
    assert "requirements-train.txt" in (ROOT / "training" / "__init__.py").read_text(encoding="utf-8")
    importers = []
    for path in (ROOT / "webui").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.split(".")[0] == "training" for name in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers == []  # only the train and evaluate commands reach it, at run time (webui.cli._training)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_without_the_training_folder_say_so(monkeypatch, capsys, command):
    from webui import cli

    # what an installed wheel looks like (modules an earlier test imported are hidden too: a cached
    # training.train would otherwise start a real training run)
    for name in ["training", *(name for name in sys.modules if name.startswith("training."))]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "training/" in err and "checkout" in err


def test_a_missing_training_dependency_is_named(monkeypatch, capsys):
    import training.train  # noqa: F401  (loaded, then hidden with one of its dependencies)
    from webui import cli

    monkeypatch.delitem(sys.modules, "training.train")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tqdm" in err and "requirements-train.txt" in err, err


@pytest.mark.parametrize(
    ("defaults", "steps", "sampler"),
    [
        ({"steps": 4, "sampler": "LCM"}, 4, "LCM"),
        ({"steps": 1, "sampler": " Euler SGM Uniform "}, 1, "Euler SGM Uniform"),
        ({"steps": 0, "sampler": ""}, None, None),
        ({"steps": True, "sampler": 7}, None, None),
        ({"steps": 4.5, "sampler": "x" * 65}, None, None),
        ({"steps": 1001}, None, None),
        ("LCM", None, None),
    ],
)
def test_a_model_recommends_its_steps_and_sampler(defaults, steps, sampler):
    from webui.engine.model_defaults import model_default_sampler, model_default_steps

    index = {"defaults": defaults}
    assert (model_default_steps(index), model_default_sampler(index)) == (steps, sampler)
