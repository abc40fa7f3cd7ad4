"""Memory levers: every attention backend and low-memory mode gives the default's image, the plan
follows the free memory, and a batch that runs out of memory is retried one rung lower."""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref

import numpy as np
import pytest
import torch
from components import bundle_from

from webui.api import hookimpl, make_plugin_manager
from webui.cli import build_parser, memory_settings
from webui.engine import memory
from webui.engine.memory import MemoryPlan, MemorySettings, applied, choose_plan, lower_plan
from webui.engine.pipeline import Engine
from webui.errors import InvalidRequestError, OutOfMemoryError
from webui.request import GenerationRequest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

REQUEST = GenerationRequest(
    prompt="a red circle", steps=3, seed=7, width=64, height=64, batch_size=2, sampler="Euler", cfg_scale=5.0
)
CPU = torch.device("cpu")
GPU = torch.device("cuda")  # only as a value: no test here touches a GPU


def plugins(*extra):
    return make_plugin_manager(entry_points=False, plugin_dirs=[], extra=extra)


def run(components, settings=None, *, extra=(), request=REQUEST):
    bundle = bundle_from(components)
    engine = Engine(plugins=plugins(*extra), memory=settings)
    return engine.generate(request, bundle=bundle), bundle


def pixels(result):
    return np.stack([np.asarray(item.image, dtype=np.float32) for item in result.images])


@pytest.fixture(scope="module")
def default(components):
    result, _ = run(components)
    return pixels(result)


@pytest.mark.parametrize(
    ("settings", "tolerance"),
    [
        (MemorySettings(attention="sliced"), 0.5),
        (MemorySettings(attention="xformers"), 0.0),  # no GPU here: falls back to SDPA, the very same image
        (MemorySettings(vae_slicing="on"), 0.5),
        (MemorySettings(offload="model"), 0.0),
        (MemorySettings(offload="sequential"), 0.0),
        (MemorySettings(vae_tiling="on"), 6.0),  # overlapping tiles are blended: near the seams pixels move
        (MemorySettings(channels_last=True), 0.5),  # last: the layout stays on the shared test modules
    ],
)
def test_every_backend_and_mode_gives_the_default_image(components, default, settings, tolerance):
    result, bundle = run(components, settings)
    got = pixels(result)
    assert got.shape == default.shape
    assert np.abs(got - default).mean() <= tolerance, settings
    assert np.abs(got - default).max() <= max(8 * tolerance, 2.0), settings
    # the cached model is as it was: processors, VAE flags, device, no hooks left behind
    assert {type(p).__name__ for p in bundle.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert not bundle.vae.use_tiling and not bundle.vae.use_slicing
    assert bundle.execution_device is None and bundle.device == CPU
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in bundle.unet.modules())


def test_tiling_slicing_and_offload_really_happen(components):
    bundle = bundle_from(components)
    latents = torch.randn(1, 4, 8, 16)
    calls = []
    decode = bundle.vae.decoder.forward
    bundle.vae.decoder.forward = lambda z, *a, **k: calls.append(tuple(z.shape)) or decode(z, *a, **k)
    try:
        with applied(bundle, MemoryPlan(vae_tiling=True), CPU):
            Engine.decode_latents(bundle, torch.randn(1, 4, 32, 32))
        assert len(calls) > 1 and all(shape[-1] <= bundle.vae.tile_latent_min_size for shape in calls)
    finally:
        del bundle.vae.decoder.forward
    with applied(bundle, MemoryPlan(attention="sliced"), CPU):
        kinds = {type(p).__name__ for m in (bundle.unet, bundle.vae) for p in m.attn_processors.values()}
        assert kinds == {"SlicedAttnProcessor"}
    assert {type(p).__name__ for p in bundle.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with applied(bundle, MemoryPlan(offload="sequential"), CPU):
        assert bundle.execution_device == CPU
        hooked = [m for m in bundle.unet.modules() if m._forward_pre_hooks]
        assert len(hooked) > 20  # every layer with weights, plus the model's entry
        assert Engine.decode_latents(bundle, latents).shape == (1, 3, 16, 32)  # through the VAE's hooks
    assert not any(m._forward_pre_hooks for m in bundle.unet.modules())


def test_xformers_without_a_gpu_warns_and_uses_sdpa(caplog):
    with caplog.at_level(logging.WARNING, logger="webui.engine.memory"):
        assert memory.resolve_attention("xformers", CPU) == "sdpa"
    assert "xformers" in caplog.text and "SDPA" in caplog.text


def test_settings_refuse_unknown_choices():
    with pytest.raises(InvalidRequestError, match="attention 'flash' is not one of sdpa, xformers, sliced"):
        MemorySettings(attention="flash")
    with pytest.raises(InvalidRequestError, match="offload"):
        MemorySettings(offload="disk")


# -- choosing a plan ----------------------------------------------------------------------------


def test_the_plan_follows_free_memory_and_size(components):
    bundle = bundle_from(components)
    auto = MemorySettings()
    assert choose_plan(auto, bundle, CPU, width=64, height=64, batch=2, free=1 << 40) == MemoryPlan()
    need = memory.estimate(bundle, 512, 512, 4)
    tight = int(max(need.values()) / 0.8) - 1  # just too little for the whole batch's decode
    sliced = choose_plan(auto, bundle, CPU, width=512, height=512, batch=4, free=tight)
    assert sliced.vae_slicing and sliced.offload == "none"
    tiny = choose_plan(auto, bundle, CPU, width=512, height=512, batch=4, free=1 << 16)
    assert tiny.vae_slicing and tiny.vae_tiling and tiny.offload == "none"  # no offload on a CPU
    on_gpu = choose_plan(auto, bundle, GPU, width=512, height=512, batch=4, free=1 << 16)
    assert on_gpu.vae_tiling and on_gpu.offload in ("model", "sequential")
    # fixed choices are kept whatever the memory
    fixed = MemorySettings(vae_slicing="off", vae_tiling="off", offload="none")
    assert choose_plan(fixed, bundle, GPU, width=512, height=512, batch=4, free=1 << 16) == MemoryPlan()
    forced = MemorySettings(vae_tiling="on", offload="model", channels_last=True, attention="sliced")
    assert choose_plan(forced, bundle, CPU, width=64, height=64, batch=1, free=1 << 40) == MemoryPlan(
        attention="sliced", vae_tiling=True, offload="model", channels_last=True
    )


def test_the_ladder_goes_tiling_slicing_offload_then_smaller_batches():
    rungs, plan = [], MemoryPlan()
    while (plan := lower_plan(plan, 4, GPU)) is not None:
        rungs.append(plan.describe())
    assert rungs == [
        "tiled VAE",
        "tiled VAE, sliced VAE",
        "tiled VAE, sliced VAE, model offload",
        "tiled VAE, sliced VAE, sequential offload",
        "tiled VAE, sliced VAE, sequential offload, 2 images at a time",
        "tiled VAE, sliced VAE, sequential offload, 1 image at a time",
    ]
    rungs, plan = [], MemoryPlan()
    while (plan := lower_plan(plan, 3, CPU)) is not None:  # no offload rungs on a CPU
        rungs.append(plan.describe())
    assert rungs == [
        "tiled VAE",
        "tiled VAE, sliced VAE",
        "tiled VAE, sliced VAE, 2 images at a time",
        "tiled VAE, sliced VAE, 1 image at a time",
    ]


def test_auto_dtype(monkeypatch, components):
    monkeypatch.setattr(memory, "cpu_supports_bf16", lambda: True)
    assert memory.auto_dtype(CPU, 860_000_000) == torch.bfloat16
    assert memory.auto_dtype(CPU, 13_000_000) == torch.float32  # small models stay in fp32
    assert memory.auto_dtype(GPU, 13_000_000) == torch.float16
    monkeypatch.setattr(memory, "cpu_supports_bf16", lambda: False)
    assert memory.auto_dtype(CPU, 860_000_000) == torch.float32
    assert Engine(plugins=plugins(), dtype="auto").dtype == torch.float32
    with pytest.raises(InvalidRequestError, match="dtype"):
        Engine(plugins=plugins(), dtype="fp8")


def test_the_flags_make_the_settings():
    parse = build_parser().parse_args
    assert memory_settings(parse([])) == MemorySettings()
    assert memory_settings(parse(["--medvram"])).offload == "model"
    assert memory_settings(parse(["--lowvram", "generate"])).offload == "sequential"
    settings = memory_settings(
        parse(
            [
                "generate",
                "--attention",
                "sliced",
                "--vae-tiling",
                "on",
                "--channels-last",
                "--no-oom-retry",
                "--offload",
                "none",
            ]
        )
    )
    assert settings == MemorySettings(
        attention="sliced", vae_tiling="on", channels_last=True, recover=False, offload="none"
    )


# -- recovering from out of memory ---------------------------------------------------------------


class Exhaust:
    """Raises an out-of-memory error at a chosen point the first ``times`` times it is reached,
    holding a big tensor in the failing frame; checks that it was freed before the retry."""

    def __init__(self, times: int, error: type[BaseException] = torch.OutOfMemoryError) -> None:
        self.times, self.error, self.calls = times, error, 0
        self.held: list[weakref.ref] = []
        self.freed_before_retry: list[bool] = []

    def hit(self) -> None:
        self.calls += 1
        if self.held:
            self.freed_before_retry.append(self.held[-1]() is None)
        if self.times > 0:
            self.times -= 1
            scratch = torch.empty(1 << 20)  # what a failed attempt leaves referenced from its frames
            self.held.append(weakref.ref(scratch))
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")

    @hookimpl
    def on_step(self, step):
        if step.step == 2:
            self.hit()


def test_out_of_memory_in_a_step_is_retried_and_recorded(components, default):
    exhaust = Exhaust(times=1)
    result, bundle = run(components, extra=[exhaust])
    assert len(result.images) == 2 and exhaust.freed_before_retry == [True]
    for item in result.images:
        assert item.parameters["Memory"] == "tiled VAE (retried after running out of memory)"
        assert "Memory: tiled VAE (retried after running out of memory)" in item.parameters["infotext"]
    assert np.abs(pixels(result) - default).mean() <= 6.0  # the same picture, decoded in tiles
    assert not bundle.vae.use_tiling  # the cached model is untouched afterwards


def test_out_of_memory_in_the_decoder_walks_down_to_one_image_at_a_time(components, default):
    exhaust = Exhaust(times=3)
    bundle = bundle_from(components)
    decode = bundle.vae.decode
    bundle.vae.decode = lambda *a, **k: exhaust.hit() or decode(*a, **k)
    try:
        request = REQUEST.replace(batch_count=2)
        result = Engine(plugins=plugins()).generate(request, bundle=bundle)
    finally:
        del bundle.vae.decode
    assert [item.seed for item in result.images] == [7, 8, 9, 10]
    assert [item.index for item in result.images] == [0, 1, 2, 3]
    notes = {item.parameters["Memory"] for item in result.images}
    # the first batch needed three rungs; the second batch starts from the plan that worked
    assert notes == {
        "tiled VAE, sliced VAE, 1 image at a time (retried after running out of memory)",
        "tiled VAE, sliced VAE, 1 image at a time",
    }
    assert all(exhaust.freed_before_retry)
    first_two = pixels(result)[:2]
    assert np.abs(first_two - default).mean() <= 6.0  # seeds 7 and 8 as in the default run


def test_when_nothing_fits_the_message_is_clear_and_the_engine_goes_on(components, default):
    exhaust = Exhaust(times=100)
    bundle = bundle_from(components)
    engine = Engine(plugins=plugins(exhaust))
    with pytest.raises(
        OutOfMemoryError, match=r"out of memory even with the lowest-memory plan .*smaller size"
    ):
        engine.generate(REQUEST, bundle=bundle)
    assert exhaust.calls == 4  # default, tiled, sliced, 1 at a time: the first image fails each time
    gc.collect()
    assert all(ref() is None for ref in exhaust.held)  # nothing from the failed attempts is kept
    exhaust.times = 0
    again = engine.generate(REQUEST, bundle=bundle)  # the same engine and model serve the next request
    assert np.abs(pixels(again) - default).max() <= 1.0  # (the shared test modules are channels-last by now)
    assert "Memory" not in again.images[0].parameters


def test_other_errors_and_a_disabled_retry_are_not_retried(components):
    exhaust = Exhaust(times=1, error=ValueError)
    with pytest.raises(ValueError):
        run(components, extra=[exhaust])
    assert exhaust.calls == 1
    exhaust = Exhaust(times=1)
    with pytest.raises(torch.OutOfMemoryError):
        run(components, MemorySettings(recover=False), extra=[exhaust])
    assert exhaust.calls == 1


def test_out_of_memory_is_recognised():
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 4 GB"
        )
    )
    assert memory.is_out_of_memory(MemoryError())
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert dataclasses.replace(MemoryPlan(), max_batch=1).describe() == "1 image at a time"


def test_the_heap_is_trimmed_before_the_vae_decode_on_the_cpu(components, monkeypatch):
    import sys

    if sys.platform == "linux":
        assert memory._malloc_trim() is not None  # glibc here: the trim is real
    memory.trim_heap()  # and harmless to call at any time
    events: list[str] = []
    monkeypatch.setattr("webui.engine.pipeline.trim_heap", lambda: events.append("trim"))
    decode = Engine.decode_latents

    def spied(bundle, latents):
        events.append("decode")
        return decode(bundle, latents)

    monkeypatch.setattr(Engine, "decode_latents", staticmethod(spied))
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    request = GenerationRequest(prompt="a red circle", steps=2, seed=1, width=64, height=64)
    result = engine.generate(request, bundle=bundle_from(components))
    assert len(result.images) == 1 and events == ["trim", "decode"]
