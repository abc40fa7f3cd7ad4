"""The testing kit for plugin authors (``webui.testing``): a tiny offline model, an engine with a
plugin, a request on each task, and the check of a plugin's hooks against the contract."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from webui.api import Conditioning, GenerationRequest, RunContext, hookimpl
from webui.plugins import BUILTIN_PLUGINS
from webui.testing import (
    TINY_CONTROLNET,
    TINY_MODEL,
    PluginCheckError,
    check_hooks,
    hook_problems,
    make_engine,
    run_task,
    sample_image,
    sample_mask,
    save_controlnet,
    tiny_bundle,
    tiny_controlnet,
)

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

TASKS = ("txt2img", "img2img", "inpaint", "seg2img")


class Recorder:
    """A plugin written as an author would: it records what it sees and darkens the output."""

    LATENT_STUDIO_API = 1

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    @hookimpl
    def prepare_request(self, request: GenerationRequest, context: RunContext) -> None:
        self.seen.append(("prepare_request", request.task, 0))

    @hookimpl(trylast=True)
    def provide_conditioning(self, request: GenerationRequest, conditioning: Conditioning) -> None:
        self.seen.append(("provide_conditioning", request.task, len(conditioning.controls)))

    @hookimpl
    def write_metadata(self, parameters, request):
        parameters["Recorded"] = request.task


@pytest.fixture(scope="module")
def recorder():
    return Recorder()


@pytest.fixture(scope="module")
def engine(recorder):
    return make_engine(recorder)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- check_hooks ------------------------------------------------------------------------------


def test_a_good_plugin_and_every_builtin_pass():
    check_hooks(Recorder())
    assert hook_problems(Recorder()) == []
    for name in BUILTIN_PLUGINS:
        check_hooks(importlib.import_module(name))


def test_a_misspelled_hook_or_argument_is_named_with_the_fix():
    class Misspelled:
        @hookimpl
        def provide_conditionning(self, request, context, conditioning):
            pass

        @hookimpl
        def prepare_request(self, request, ctx):
            pass

        @hookimpl(specname="write_metadata")
        def record(self, parameters, image, req):
            pass

        def on_step(self, step):  # forgot @hookimpl
            pass

    problems = hook_problems(Misspelled())
    assert problems == [
        "on_step: named like a hook but not decorated with @hookimpl, so it is never called",
        "prepare_request: no argument 'ctx'; the hook's arguments are request, context",
        "provide_conditionning: no hook is named 'provide_conditionning'; did you mean provide_conditioning?",
        "record (hook write_metadata): no argument 'req'; the hook's arguments are parameters, image, "
        "request, context",
    ]
    with pytest.raises(PluginCheckError) as caught:
        check_hooks(Misspelled())
    assert str(caught.value) == (
        "plugin Misspelled does not fit the Latent Studio plugin API 1:\n  " + "\n  ".join(problems)
    )
    assert isinstance(caught.value, AssertionError)  # pytest shows it as a failed check


def test_an_other_api_version_and_what_only_pluggy_checks_are_reported():
    class Future:
        LATENT_STUDIO_API = (2, 3)

        @hookimpl
        def startup(self, engine):
            pass

    assert hook_problems(Future()) == [
        "LATENT_STUDIO_API: needs plugin API 2 or 3; this Latent Studio provides API 1"
    ]

    class NotAGenerator:
        @hookimpl(hookwrapper=True)
        def postprocess_images(self, images):
            return None

    (problem,) = hook_problems(NotAGenerator())
    assert "postprocess_images" in problem and "generator" in problem


def test_helpers_imported_into_a_plugin_module_are_not_its_hooks(tmp_path, monkeypatch):
    (tmp_path / "kit_plugin_xyz.py").write_text(
        "from webui.api import hookimpl, encode_prompts, image_to_tensor\n\n"
        "@hookimpl\ndef startup(engine):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("kit_plugin_xyz")
    assert hook_problems(module) == []


# --- make_engine ------------------------------------------------------------------------------


def test_make_engine_has_the_builtins_the_plugin_and_nothing_installed(
    engine, recorder, tmp_path, monkeypatch
):
    sources = {record.source for record in engine.plugins.records.values()}
    assert sources == {"builtin", "extra"}
    assert set(BUILTIN_PLUGINS) <= set(engine.plugins.records)
    assert engine.plugins.is_registered(recorder)
    (tmp_path / "dropin.py").write_text("raise RuntimeError('never loaded')\n")
    monkeypatch.setenv("LATENT_STUDIO_PLUGIN_DIRS", str(tmp_path))
    fresh = make_engine(Recorder(), bundle=engine.models.get(TINY_MODEL))
    assert "plugins/dropin.py" not in fresh.plugins.records
    assert engine.models.get(None) is engine.models.get(TINY_MODEL)
    assert engine.models.get_controlnet(TINY_CONTROLNET) is engine.models.get(TINY_MODEL).controlnets["seg"]


def test_make_engine_refuses_a_plugin_that_cannot_register():
    class BadArgument:
        @hookimpl
        def startup(self, engine, not_an_argument):
            pass

    with pytest.raises(PluginCheckError, match="plugin not registered: BadArgument-0: .*not_an_argument"):
        make_engine(BadArgument(), bundle=tiny_bundle(controlnet=False))

    class Future:
        LATENT_STUDIO_API = 2

    with pytest.raises(PluginCheckError, match="needs plugin API 2; this Latent Studio provides API 1"):
        make_engine(Future(), bundle=tiny_bundle(controlnet=False))


def test_the_tiny_model_is_the_same_each_time_and_leaves_the_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_bundle()
    b = tiny_bundle()
    assert torch.equal(torch.rand(3), expected)
    for left, right in zip(a.modules(), b.modules(), strict=True):
        for (name, x), (_, y) in zip(left.state_dict().items(), right.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert a.default_size == 64 and a.family == "sd1"
    assert a.tokenizers[0]("a cat").input_ids[1:3] != a.tokenizers[0]("a dog").input_ids[1:3]


# --- run_task ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_each_task_runs_with_the_plugin_and_returns_images_of_the_size(engine, recorder, task):
    recorder.seen.clear()
    result = run_task(engine, task, width=64, height=48, batch_size=2)
    assert [item.image.size for item in result.images] == [(64, 48), (64, 48)]
    assert result.seeds == [1, 2]
    assert "Recorded: " + task in result.infotexts[0]
    controls = 1 if task == "seg2img" else 0
    assert recorder.seen == [("prepare_request", task, 0), ("provide_conditioning", task, controls)]
    first, second = (pixels(item.image) for item in result.images)
    assert np.abs(first - second).max() > 0  # two seeds, two images
    assert first.std() > 1  # a decoded image, not a flat colour


def test_the_tasks_use_their_inputs(engine):
    base = pixels(run_task(engine, "txt2img").images[0].image)
    light = pixels(run_task(engine, "img2img", strength=0.5, steps=4).images[0].image)
    init = pixels(sample_image())
    assert np.abs(light - init).mean() < np.abs(base - init).mean()  # img2img starts from the image
    inpainted = pixels(run_task(engine, "inpaint", mask_blur=0).images[0].image)
    outside = pixels(sample_mask()) == 0
    assert np.array_equal(inpainted[outside], init[outside])  # kept as it was, around the mask
    assert np.abs(inpainted[~outside] - init[~outside]).max() > 0
    seg = run_task(engine, "seg2img")
    named = run_task(engine, "seg2img", controlnet=TINY_CONTROLNET)
    assert np.array_equal(pixels(seg.images[0].image), pixels(named.images[0].image))
    assert np.abs(pixels(seg.images[0].image) - base).max() > 0  # the ControlNet changed the image
    assert f"Model: {TINY_CONTROLNET}" in named.infotexts[0]


def test_an_inpainting_model(tmp_path):
    engine = make_engine(bundle=tiny_bundle(in_channels=9, controlnet=False))
    result = run_task(engine, "inpaint", width=48, height=48)
    assert result.images[0].image.size == (48, 48)


# --- a ControlNet of the plugin's own -----------------------------------------------------------


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_tiny_controlnet_is_the_tiny_models_kind_random_per_seed_and_leaves_the_random_state_alone():
    bundle = tiny_bundle()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = tiny_controlnet(bundle.unet, seed=3)
    assert torch.equal(torch.rand(3), expected)
    assert _same(_weights(first), _weights(tiny_controlnet(bundle.unet, seed=3)))
    assert not _same(_weights(first), _weights(tiny_controlnet(bundle.unet, seed=4)))
    # the segmentation ControlNet of the tiny model is the one of seed 0, with a palette
    assert _same(_weights(bundle.controlnets["seg"]), _weights(tiny_controlnet(bundle.unet)))
    assert not hasattr(first, "seg_palette") and not first.training
    assert first.controlnet_mid_block.weight.abs().max() > 0  # its outputs are not zero: it acts
    # its encoder is the UNet's, as from_unet makes it
    assert torch.equal(first.conv_in.weight, bundle.unet.conv_in.weight)
    assert first.config.cross_attention_dim == bundle.unet.config.cross_attention_dim
    # without a UNet: the tiny model's
    assert _same(_weights(tiny_controlnet(seed=3)), _weights(first))
    # for a VAE that downscales 8 times, the control image is halved three times
    assert tuple(tiny_controlnet(bundle.unet, downscale=8).config.conditioning_embedding_out_channels) == (
        16,
        32,
        64,
        128,
    )
    with pytest.raises(ValueError, match="downscale must be a power of 2, got 3"):
        tiny_controlnet(bundle.unet, downscale=3)


def test_an_inpainting_models_controlnet_takes_the_latents_alone():
    bundle = tiny_bundle(in_channels=9)
    model = bundle.controlnets["seg"]
    assert model.config.in_channels == 4  # the latents, not the mask and the masked image
    assert torch.equal(model.conv_in.weight, bundle.unet.conv_in.weight[:, :4])
    first_block = model.down_blocks[0].resnets[0].conv1.weight
    assert torch.equal(first_block, bundle.unet.down_blocks[0].resnets[0].conv1.weight)
    engine = make_engine(bundle=bundle)
    seg = pixels(run_task(engine, "seg2img").images[0].image)
    named = pixels(run_task(engine, "seg2img", controlnet=TINY_CONTROLNET).images[0].image)
    assert np.array_equal(seg, named)
    assert np.abs(seg - pixels(run_task(engine, "txt2img").images[0].image)).max() > 0  # the ControlNet acts


def test_a_saved_controlnet_is_listed_and_loaded_by_name(tmp_path):
    model = tiny_controlnet(seed=2)
    folder = save_controlnet(model, tmp_path, "edges")
    nested = save_controlnet(tiny_controlnet(seed=3), tmp_path, "lines/scribble")
    assert folder == tmp_path / "controlnet" / "edges" and (folder / "config.json").is_file()
    assert [p.suffix for p in folder.glob("diffusion_pytorch_model.*")] == [".safetensors"]
    assert nested == tmp_path / "controlnet" / "lines" / "scribble"
    engine = make_engine(models_dir=str(tmp_path), bundle=tiny_bundle(controlnet=False))
    assert [entry.name for entry in engine.models.list("controlnet")] == ["edges", "lines/scribble"]
    loaded = engine.models.get_controlnet("edges")
    assert loaded is not model and _same(_weights(loaded), _weights(model))
    # a request names it like an installed one
    seg = run_task(engine, "seg2img", controlnet="lines/scribble")
    assert "Model: lines/scribble" in seg.infotexts[0]
    for bad in ("../outside", str(tmp_path / "absolute"), "", "a\\b"):
        with pytest.raises(ValueError, match="give a relative folder name inside models/controlnet"):
            save_controlnet(model, tmp_path, bad)
    assert not (tmp_path / "outside").exists()
