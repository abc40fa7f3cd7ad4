"""Every hook in the contract, exercised by a plugin written the way a community author would."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from components import engine_with
from PIL import Image

from webui import hookspecs
from webui.api import (
    ControlInput,
    Engine,
    GenerationControl,
    GenerationRequest,
    ModelEntry,
    PluginError,
    SecondPass,
    hookimpl,
    make_plugin_manager,
)

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, obj in inspect.getmembers(hookspecs) if hasattr(obj, "latent_studio_spec")]
BASE = dict(prompt="a blue square", steps=3, seed=4, width=64, height=64, sampler="Euler")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def test_every_hook_is_documented_in_code_and_docs():
    hook_docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert len(HOOKS) >= 10
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 40, f"hook {name} has no real docstring"
        assert f"`{name}" in hook_docs, f"hook {name} is not documented in docs/plugins.md"


def test_every_hook_has_a_test():
    source = Path(__file__).read_text()
    for name in HOOKS:
        assert f"def {name}(" in source, f"no test plugin implements {name}"


def test_register_models_and_load_model(bundle):
    class MemoryModels:
        @hookimpl
        def register_models(self, register, models_dir):
            register(ModelEntry(name="in-memory", source="memory:tiny"))

        @hookimpl
        def load_model(self, source, kind, context):
            return bundle if source == "memory:tiny" and kind == "checkpoint" else None

    engine = engine_with(MemoryModels())
    assert [e.name for e in engine.models.list("checkpoint")] == ["in-memory"]
    assert engine.models.get("in-memory") is bundle
    result = engine.generate(GenerationRequest(model="in-memory", **BASE))
    assert "Model: tiny" in result.infotexts[0]
    assert engine.models.get(None) is bundle  # the only model listed is the default


def test_startup_sees_the_ready_engine():
    seen = []

    class Startup:
        @hookimpl
        def startup(self, engine):
            seen.append(("Euler" in engine.schedulers, engine.models is not None))

    engine_with(Startup())
    assert seen == [(True, True)]


def test_register_schedulers_overrides_a_builtin(bundle):
    from diffusers import DDIMScheduler

    class Override:
        @hookimpl
        def register_schedulers(self, register):
            register("Euler", DDIMScheduler)

    engine = engine_with(Override())
    assert engine.schedulers.get("Euler").factory is DDIMScheduler


def test_register_upscalers_adds_an_upscaler_the_extras_and_hires_fix_can_use():
    class Box:
        @hookimpl
        def register_upscalers(self, register):
            register("Box", resample=lambda image, size: image.resize(size, Image.Resampling.BOX))
            # a built-in's name: a plugin's hook runs before the built-in's, and the first one wins
            register("Lanczos", resample=lambda image, size: image.resize(size, Image.Resampling.NEAREST))

    engine = engine_with(Box())
    assert engine.upscalers.names()[:3] == ["Box", "Lanczos", "Nearest"]
    source = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, "RGB")
    result = engine.upscalers.upscale(source, "Box", size=(2, 2))
    assert np.array_equal(np.asarray(result), np.asarray(source.resize((2, 2), Image.Resampling.BOX)))
    replaced = engine.upscalers.upscale(source, "Lanczos", scale=2)
    assert np.array_equal(np.asarray(replaced), np.asarray(source).repeat(2, axis=0).repeat(2, axis=1))


def test_prepare_request_can_round_sizes(bundle):
    class RoundSizes:
        @hookimpl
        def prepare_request(self, request, context):
            request.width = (request.width + 7) // 8 * 8
            request.height = (request.height + 7) // 8 * 8

    request = GenerationRequest(**{**BASE, "width": 57, "height": 60})
    with pytest.raises(Exception, match="multiple of 8"):
        engine_with().generate(request, bundle=bundle)
    result = engine_with(RoundSizes()).generate(request, bundle=bundle)
    assert result.images[0].image.size == (64, 64)
    assert "Size: 64x64" in result.infotexts[0]


def test_register_fields_declares_a_checked_recorded_field(bundle):
    class Brightness:
        @hookimpl
        def register_fields(self, register):
            register("brightness", "float", default=0.0, minimum=-1.0, maximum=1.0, infotext="Brightness")

        @hookimpl
        def postprocess_images(self, images, request, context):
            for item in images:
                array = np.asarray(item.image, dtype=np.float32) + 255 * request.extra["brightness"]
                item.image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))

    engine = engine_with(Brightness())
    assert engine.fields["brightness"].plugin is not None
    plain = engine.generate(GenerationRequest(**BASE), bundle=bundle)  # the default is filled in
    assert "Brightness" not in plain.infotexts[0]  # the default is not recorded
    bright = engine.generate(GenerationRequest(**BASE, extra={"brightness": 0.5}), bundle=bundle)
    assert pixels(bright).mean() > pixels(plain).mean() + 60
    assert "Brightness: 0.5" in bright.infotexts[0]
    with pytest.raises(Exception, match="brightness must be between -1 and 1, got 3"):
        engine.generate(GenerationRequest(**BASE, extra={"brightness": 3}), bundle=bundle)


def test_register_tasks_adds_a_task_run_by_the_one_loop(bundle):
    class Negative:
        @hookimpl
        def register_tasks(self, register):
            register("negative", "Negative of an image", requires=("source",), message="give a source image")

        @hookimpl
        def register_fields(self, register):
            register("source", "image", tasks=("negative",))

        @hookimpl
        def postprocess_images(self, images, request, context):
            if request.task == "negative":
                for item in images:
                    item.image = Image.fromarray(
                        255 - np.asarray(request.extra["source"].resize(item.image.size))
                    )

    engine = engine_with(Negative())
    with pytest.raises(Exception, match="unknown task 'negative'"):
        engine_with().generate(GenerationRequest(**BASE, task="negative"), bundle=bundle)
    with pytest.raises(Exception, match="give a source image"):
        engine.generate(GenerationRequest(**BASE, task="negative"), bundle=bundle)
    source = Image.new("RGB", (64, 64), (10, 200, 30))
    result = engine.generate(
        GenerationRequest(**BASE, task="negative", extra={"source": source}), bundle=bundle
    )
    assert result.images[0].image.getpixel((5, 5)) == (245, 55, 225)


def test_provide_conditioning_adds_a_control(bundle):
    from components import make_controlnet

    controlnet = make_controlnet(bundle.unet)

    class EdgeControl:
        @hookimpl
        def provide_conditioning(self, request, context, conditioning):
            image = torch.zeros(1, 3, context.height, context.width)
            image[:, :, :, : context.width // 2] = 1.0
            conditioning.controls.append(ControlInput(model=controlnet, image=image, scale=1.0, name="edges"))
            conditioning.metadata["Edges"] = "left half"

    plain = engine_with().generate(GenerationRequest(**BASE), bundle=bundle)
    controlled = engine_with(EdgeControl()).generate(GenerationRequest(**BASE), bundle=bundle)
    assert np.abs(pixels(plain) - pixels(controlled)).max() > 0
    assert "Edges: left half" in controlled.infotexts[0]


def test_patch_model_applies_for_one_request_and_undoes(bundle):
    saved = bundle.unet.conv_in.bias.detach().clone()
    seen = []

    class Brighter:
        @hookimpl
        def patch_model(self, request, context, patches):
            bias = context.bundle.unet.conv_in.bias
            patches.add("brighter", lambda: bias.data.add_(0.5), lambda: bias.data.copy_(saved))

        @hookimpl
        def on_step(self, step):
            seen.append(float((step.context.bundle.unet.conv_in.bias - saved).max()))

    plain = engine_with().generate(GenerationRequest(**BASE), bundle=bundle)
    patched = engine_with(Brighter()).generate(GenerationRequest(**BASE), bundle=bundle)
    assert seen == [0.5] * 3
    assert np.abs(pixels(plain) - pixels(patched)).max() > 0
    assert torch.equal(bundle.unet.conv_in.bias, saved)  # undone, bit for bit


def test_wrap_denoiser_sees_each_step(bundle):
    calls = []

    class Counter:
        @hookimpl
        def wrap_denoiser(self, request, context):
            def wrap(call):
                def counted(model_input, step):
                    calls.append((step.index, step.total, int(step.timestep), step.sigma is not None))
                    return call(model_input, step)

                return counted

            return wrap

    engine_with(Counter()).generate(GenerationRequest(**BASE), bundle=bundle)
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3)]
    assert calls[0][2] > calls[1][2] > calls[2][2] and all(c[3] for c in calls)  # Euler has sigmas


def test_wrap_guidance_replaces_the_combination(bundle):
    class TextOnly:
        @hookimpl
        def wrap_guidance(self, request, context):
            return lambda combine: lambda uncond, cond, scale, step: combine(uncond, cond, 1.0, step)

    unguided = engine_with().generate(GenerationRequest(**{**BASE, "cfg_scale": 1.0}), bundle=bundle)
    wrapped = engine_with(TextOnly()).generate(GenerationRequest(**{**BASE, "cfg_scale": 7.0}), bundle=bundle)
    assert np.abs(pixels(unguided) - pixels(wrapped)).max() <= 1  # scale 1 is the text prediction alone


def test_on_step_reports_progress_and_can_interrupt(bundle):
    steps = []

    class Progress:
        @hookimpl
        def on_step(self, step):
            steps.append((step.step, step.total, tuple(step.latents.shape)))
            if step.step == 2 and step.context.request.extra.get("stop"):
                step.context.control.interrupt()

    engine = engine_with(Progress())
    engine.generate(GenerationRequest(**{**BASE, "steps": 4}), bundle=bundle)
    assert steps == [(k, 4, (1, 4, 32, 32)) for k in range(1, 5)]
    steps.clear()
    result = engine.generate(
        GenerationRequest(**{**BASE, "steps": 4, "batch_count": 3, "extra": {"stop": True}}), bundle=bundle
    )
    assert [s[0] for s in steps] == [1, 2]  # stopped within one step
    assert result.interrupted and len(result.images) == 1  # what was finished is kept


def test_skip_drops_only_the_current_batch(bundle):
    control = GenerationControl()
    calls = []

    def callback(step):
        calls.append(step.context.batch_index)
        if step.context.batch_index == 0 and step.step == 1:
            control.skip()

    result = engine_with().generate(
        GenerationRequest(**{**BASE, "batch_count": 2}), bundle=bundle, callback=callback, control=control
    )
    assert not result.interrupted
    assert [item.seed for item in result.images] == [BASE["seed"] + 1]
    assert calls.count(0) == 1 and calls.count(1) == 3


def test_second_pass_denoises_again_at_another_size(bundle):
    class Twice:
        @hookimpl
        def second_pass(self, request, context, latents):
            bigger = torch.nn.functional.interpolate(latents, scale_factor=1.5, mode="nearest")
            return SecondPass(
                request=request.replace(width=96, height=96, strength=0.5, steps=4), latents=bigger
            )

    steps = []
    result = engine_with(Twice()).generate(GenerationRequest(**BASE), bundle=bundle, callback=steps.append)
    assert result.images[0].image.size == (96, 96)
    assert [(s.step, s.total, s.context.width) for s in steps] == [
        (1, 3, 64),
        (2, 3, 64),
        (3, 3, 64),
        (1, 2, 96),
        (2, 2, 96),
    ]
    assert "Size: 64x64" in result.infotexts[0]  # the images keep the first request's parameters

    class Wrong:
        @hookimpl
        def second_pass(self, request, context, latents):
            return SecondPass(request=request.replace(width=96, height=96), latents=latents)

    with pytest.raises(PluginError, match="do not fit its size 96x96"):
        engine_with(Wrong()).generate(GenerationRequest(**BASE), bundle=bundle)


def test_postprocess_images_transforms_in_place(bundle):
    class Mirror:
        @hookimpl
        def postprocess_images(self, images, request, context):
            for item in images:
                item.image = item.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    plain = pixels(engine_with().generate(GenerationRequest(**BASE), bundle=bundle))
    mirrored = pixels(engine_with(Mirror()).generate(GenerationRequest(**BASE), bundle=bundle))
    assert np.array_equal(mirrored, plain[:, ::-1])


def test_write_metadata_adds_and_removes_keys(bundle):
    class Meta:
        @hookimpl
        def write_metadata(self, parameters, image, request, context):
            parameters["Hires upscale"] = 2
            parameters["Model hash"] = None  # None entries are left out

    text = engine_with(Meta()).generate(GenerationRequest(**BASE), bundle=bundle).infotexts[0]
    assert text.splitlines()[-1].endswith("Model: tiny, Hires upscale: 2")
    assert "Model hash" not in text


def test_parse_metadata_first_result_wins():
    class Custom:
        @hookimpl
        def parse_metadata(self, text):
            return {"Prompt": text[len("CUSTOM:") :]} if text.startswith("CUSTOM:") else None

    pm = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=[Custom()])
    assert pm.hook.parse_metadata(text="CUSTOM:hello") == {"Prompt": "hello"}
    parsed = pm.hook.parse_metadata(
        text="a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    )
    assert parsed["Prompt"] == "a cat" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "1"


def test_register_ui_tabs_adds_and_replaces_tabs(tmp_path):
    import gradio as gr

    from webui.ui.app import build_app, collect_tabs
    from webui.ui.service import StudioService

    built = []

    class Gallery:
        @hookimpl
        def register_ui_tabs(self, register):
            def build(ui):
                built.append(sorted(ui.tabs))  # the generation tabs built before this one
                gr.Markdown("community tab", elem_id="community-tab")

            register("community", "Community", build, order=50)
            register(
                "pnginfo",
                "Image info",
                lambda ui: gr.Markdown("replaced", elem_id="replaced-pnginfo"),
                order=95,
            )

    plugins = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=[Gallery()])
    specs = collect_tabs(plugins)
    assert [s.id for s in specs] == [
        "txt2img",
        "img2img",
        "inpaint",
        "seg2img",
        "community",
        "extras",
        "pnginfo",
        "plugins",
    ]
    assert specs[-2].label == "Image info"  # the plugin registered first, so its pnginfo wins
    engine = Engine(plugins=plugins, models_dir=str(ROOT / "models"))
    demo = build_app(StudioService(engine, tmp_path), plugins=plugins)
    labels = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert labels == [
        "Text to image",
        "Image to image",
        "Inpainting",
        "Segmentation to image",
        "Community",
        "Extras",
        "Image info",
        "Plugins",
    ]
    assert built == [["img2img", "inpaint", "seg2img", "txt2img"]]
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"community-tab", "replaced-pnginfo", "txt2img-generate"} <= ids
