"""``--compile``: the UNet through torch.compile gives the uncompiled image, reads weights changed in
place, steps aside for a UNet patched with hooks or replaced modules, survives a compiler that fails,
and says in the image metadata what really ran."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from components import bundle_from

from webui.api import ModelPatches, hookimpl, make_plugin_manager
from webui.cli import build_parser, memory_settings
from webui.engine import compiled as compiled_module
from webui.engine.compiled import CompiledUNets, is_compile_error, structure, use_cache_dir
from webui.engine.memory import MemoryPlan, MemorySettings, choose_plan, lower_plan
from webui.engine.pipeline import Engine
from webui.request import GenerationRequest

REQUEST = GenerationRequest(
    prompt="a red circle", steps=3, seed=7, width=64, height=64, batch_size=1, sampler="Euler", cfg_scale=5.0
)
CPU = torch.device("cpu")
GPU = torch.device("cuda")  # only as a value: no test here touches a GPU


def engine(*extra, compile: bool = True, backend: str = "eager") -> Engine:
    plugins = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=extra)
    result = Engine(plugins=plugins, memory=MemorySettings(compile=compile))
    result.compiled = CompiledUNets(backend)
    return result


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(item.image, dtype=np.float32) for item in result.images])


class HookOnConvIn:
    """A patch that puts a forward hook on the UNet's first convolution (as feature caches and
    token merging do): the output moves, and a compiled graph made before it would not see it."""

    @hookimpl
    def patch_model(self, request, context, patches: ModelPatches) -> None:
        unet = context.bundle.unet
        handles = []

        def apply() -> None:
            handles.append(unet.conv_in.register_forward_hook(lambda _m, _a, out: out + 0.3))

        patches.add("shift", apply, lambda: handles.pop().remove())


class BiasInPlace:
    """A patch that changes a weight in place (``.data``, as the hook documentation's example)."""

    @hookimpl
    def patch_model(self, request, context, patches: ModelPatches) -> None:
        bias = context.bundle.unet.conv_in.bias

        def apply() -> None:
            bias.data.add_(0.3)

        patches.add("bias", apply, lambda: bias.data.sub_(0.3))


# -- the plan and the command line ------------------------------------------------------------


def test_the_plan_compiles_only_without_offload():
    compiling_plan = MemoryPlan(compile=True)
    assert compiling_plan.describe() == "compiled UNet"
    assert MemorySettings().compile is False and MemoryPlan().describe() == "default"
    # a lower rung with offload hooks drops compiling; the rungs before it keep it
    assert lower_plan(compiling_plan, 1, CPU).compile is True
    lowered = lower_plan(MemoryPlan(compile=True, vae_tiling=True, vae_slicing=True), 1, GPU)
    assert lowered is not None and lowered.offload == "model" and lowered.compile is False


def test_choose_plan_keeps_compile_unless_offloading(bundle):
    free = 10**12
    plan = choose_plan(MemorySettings(compile=True), bundle, CPU, width=64, height=64, batch=1, free=free)
    assert plan.compile is True
    offloaded = choose_plan(
        MemorySettings(compile=True, offload="sequential"),
        bundle,
        GPU,
        width=64,
        height=64,
        batch=1,
        free=free,
    )
    assert offloaded.compile is False and offloaded.offload == "sequential"
    starved = choose_plan(MemorySettings(compile=True), bundle, GPU, width=64, height=64, batch=1, free=1)
    assert starved.offload != "none" and starved.compile is False


def test_the_compile_flag():
    parser = build_parser()
    assert memory_settings(parser.parse_args(["--compile"])).compile is True  # the web app
    assert memory_settings(parser.parse_args(["generate", "--compile"])).compile is True
    assert memory_settings(parser.parse_args([])).compile is False


def test_the_cache_folder_follows_the_app_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LATENT_STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    folder = use_cache_dir()
    assert folder == str(tmp_path / "cache" / compiled_module.CACHE_SUBDIR) and os.path.isdir(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_cache_dir() == str(tmp_path / "mine")
    # torch writes its own default (in the temporary folder) into the variable: that is not a choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use_cache_dir() == folder


def test_compile_errors_are_told_from_run_errors():
    from torch._dynamo.exc import BackendCompilerFailed

    assert is_compile_error(BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None))
    assert not is_compile_error(RuntimeError("shape mismatch"))
    assert not is_compile_error(torch.OutOfMemoryError("out of memory"))


# -- routing (Dynamo tracing with the "eager" backend: seconds) ---------------------------------


def test_structure_sees_hooks_replaced_modules_and_forward(bundle):
    unet = bundle.unet
    before = structure(unet)
    handle = unet.conv_in.register_forward_pre_hook(lambda _m, args: args)
    assert structure(unet) != before
    handle.remove()
    assert structure(unet) == before
    original = unet.conv_out
    unet.conv_out = torch.nn.Conv2d(original.in_channels, original.out_channels, 3, padding=1)
    try:
        assert structure(unet) != before
    finally:
        unet.conv_out = original
    unet.forward = unet.forward
    try:
        assert structure(unet) != before
    finally:
        del unet.forward
    assert structure(unet) == before


def test_compiled_route_gives_the_uncompiled_image(components):
    bundle = bundle_from(components)
    plain = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[])).generate(
        REQUEST, bundle=bundle
    )
    compiled = engine()
    result = compiled.generate(REQUEST, bundle=bundle)
    assert compiled.compiled.calls(bundle.unet) == REQUEST.steps  # every step through the compiled UNet
    assert np.abs(pixels(result) - pixels(plain)).max() <= 1.0
    assert result.images[0].parameters["Memory"] == "compiled UNet"


def test_a_hooked_unet_runs_uncompiled_and_the_hook_counts(components):
    bundle = bundle_from(components)
    hooked_plain = engine(HookOnConvIn(), compile=False).generate(REQUEST, bundle=bundle)
    plain = engine(compile=False).generate(REQUEST, bundle=bundle)
    assert np.abs(pixels(hooked_plain) - pixels(plain)).max() > 5  # the hook changes the image

    compiling = engine(HookOnConvIn())
    compiling.compiled = shared = CompiledUNets("eager")
    first = engine()  # compiles the unpatched UNet first: the graph that must not be reused
    first.compiled = shared
    first.generate(REQUEST, bundle=bundle)
    calls = shared.calls(bundle.unet)
    hooked = compiling.generate(REQUEST, bundle=bundle)
    assert shared.calls(bundle.unet) == calls  # the patched UNet did not go through the compiled graph
    assert np.abs(pixels(hooked) - pixels(hooked_plain)).max() <= 1.0
    assert hooked.images[0].parameters["Memory"] == "UNet not compiled (patched for this request)"
    # the patch is gone after the request: the next one is compiled again
    again = first.generate(REQUEST, bundle=bundle)
    assert shared.calls(bundle.unet) == calls + REQUEST.steps
    assert again.images[0].parameters["Memory"] == "compiled UNet"


def test_a_failing_compiler_falls_back_with_a_warning(components, caplog):
    def broken(_graph, _inputs):
        raise RuntimeError("no C++ compiler here")

    bundle = bundle_from(components)
    plain = engine(compile=False).generate(REQUEST, bundle=bundle)
    failing = engine()
    failing.compiled = CompiledUNets(broken)  # type: ignore[arg-type]  # torch.compile takes a callable too
    with caplog.at_level(logging.WARNING, logger=compiled_module.__name__):
        result = failing.generate(REQUEST, bundle=bundle)
        again = failing.generate(REQUEST, bundle=bundle)
    assert np.abs(pixels(result) - pixels(plain)).max() <= 1.0
    assert np.array_equal(pixels(again), pixels(result))
    assert result.images[0].parameters["Memory"] == "UNet not compiled (compiling failed)"
    assert again.images[0].parameters["Memory"] == "UNet not compiled (compiling failed)"
    warnings = [r for r in caplog.records if "compiling the UNet failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0].getMessage()
    assert failing.compiled.calls(bundle.unet) == 0


def test_an_error_while_running_is_not_taken_for_a_compile_error(components):
    class Broken(RuntimeError):
        pass

    class Boom:
        @hookimpl
        def wrap_denoiser(self, request, context):
            def wrap(call):
                def run(model_input, step):
                    raise Broken("a plugin failed")

                return run

            return wrap

    bundle = bundle_from(components)
    with pytest.raises(Exception, match="a plugin failed"):
        engine(Boom()).generate(REQUEST, bundle=bundle)


# -- the real compiler (TorchInductor: C++ code generated and built, so slow) -------------------


@pytest.mark.slow
def test_inductor_gives_the_same_image_reads_weights_changed_in_place_and_caches(
    components, monkeypatch, tmp_path
):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LATENT_STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    bundle = bundle_from(components)
    plain = engine(compile=False).generate(REQUEST, bundle=bundle)
    shifted_plain = engine(BiasInPlace(), compile=False).generate(REQUEST, bundle=bundle)

    compiling = engine(backend="inductor")
    result = compiling.generate(REQUEST, bundle=bundle)
    assert compiling.compiled.calls(bundle.unet) == REQUEST.steps
    assert result.images[0].parameters["Memory"] == "compiled UNet"
    assert np.abs(pixels(result) - pixels(plain)).max() <= 1.0
    # generated code landed in the app's cache folder
    cache = tmp_path / "cache" / compiled_module.CACHE_SUBDIR
    assert any(path.is_file() for path in cache.rglob("*"))

    # a weight changed in place goes through the same compiled code and counts
    shifting = engine(BiasInPlace(), backend="inductor")
    shifting.compiled = compiling.compiled
    shifted = shifting.generate(REQUEST, bundle=bundle)
    assert compiling.compiled.calls(bundle.unet) == 2 * REQUEST.steps
    assert shifted.images[0].parameters["Memory"] == "compiled UNet"
    assert np.abs(pixels(shifted) - pixels(shifted_plain)).max() <= 1.0
    assert np.abs(pixels(shifted) - pixels(result)).max() > 5


def test_an_evicted_unet_is_freed_with_its_compiled_code(components):
    import gc
    import weakref

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(components["unet"].config).eval()
    compiler = CompiledUNets("eager")
    route = compiler.route(unet)
    with torch.inference_mode():
        route.call(
            torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32), return_dict=False
        )
    assert compiler.calls(unet) == 1
    gone = weakref.ref(unet)
    del unet, route
    gc.collect()
    assert gone() is None  # neither the compiler nor the compiled module kept it alive


def test_a_first_request_that_patches_does_not_keep_the_unet_from_compiling(components):
    bundle = bundle_from(components)
    shared = CompiledUNets("eager")
    hooked = engine(HookOnConvIn())
    hooked.compiled = shared
    first = hooked.generate(REQUEST, bundle=bundle)  # the very first request is a patched one
    assert first.images[0].parameters["Memory"] == "UNet not compiled (patched for this request)"
    assert shared.calls(bundle.unet) == 0
    plain = engine()
    plain.compiled = shared
    after = plain.generate(REQUEST, bundle=bundle)  # the unpatched UNet is the one compiled
    assert after.images[0].parameters["Memory"] == "compiled UNet"
    assert shared.calls(bundle.unet) == REQUEST.steps
