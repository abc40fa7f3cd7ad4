"""The opt-in approximations: token merging (``token_merging_ratio``) and DeepCache
(``deep_cache_interval``). Off, each leaves the engine's image bit for bit; on, the image differs a
little and stays close (PSNR against the exact image); the value is written to the infotext and read
back; bad values are refused; the cached model is the same afterwards; and each really saves work
(fewer tokens in the self-attention, fewer calls of the deep blocks)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from components import bundle_from, sd_components, sdxl_components
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from fixtures_models import random_image, rect_mask, seg_map

from webui.api import (
    Engine,
    GenerationRequest,
    InvalidRequestError,
    MemorySettings,
    make_plugin_manager,
    parse_infotext,
)
from webui.builtin import deep_cache, token_merging
from webui.builtin.deep_cache import DeepCache
from webui.builtin.token_merging import Merge, merge_targets, partition

BASE = dict(
    prompt="a red circle at the top left",
    negative_prompt="blurry",
    steps=6,
    seed=4,
    width=64,
    height=64,
    sampler="Euler",
    cfg_scale=5.0,
)
# Measured on the tiny models at 64x64, 6 steps (SD, SD without guidance, ControlNet, inpainting, SDXL):
# token merging 0.5-0.9 gives 51-65 dB against the exact image, DeepCache 2-3 gives 42-55 dB; another
# seed gives about 13 dB. The bound leaves a wide margin.
CLOSE_DB = 30.0
TOKENS = "token_merging_ratio"
CACHE = "deep_cache_interval"


@pytest.fixture(scope="module")
def engine():
    return Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))


@pytest.fixture(scope="module")
def sdxl_bundle(tmp_path_factory):
    return bundle_from(sdxl_components(tmp_path_factory.mktemp("sdxl")))


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory):
    return bundle_from(sd_components(tmp_path_factory.mktemp("inpaint"), in_channels=9))


def pixels(result) -> np.ndarray:
    return np.stack([item.pixels.permute(1, 2, 0).numpy() for item in result.images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def generate(engine, bundle, extra=None, **changes):
    return engine.generate(GenerationRequest(**{**BASE, **changes}, extra=dict(extra or {})), bundle=bundle)


def assert_close_not_equal(exact: np.ndarray, approximate: np.ndarray) -> None:
    assert np.isfinite(approximate).all()
    assert not np.array_equal(exact, approximate)  # the approximation really changed something
    assert psnr(exact, approximate) > CLOSE_DB


class Counter:
    """Counts the forward calls of modules (a forward hook each), removed on exit."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules, self.calls = modules, 0

    def __enter__(self) -> Counter:
        self.handles = [m.register_forward_hook(self._count) for m in self.modules]
        return self

    def _count(self, *_: object) -> None:
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# -- the fields ---------------------------------------------------------------------------------


def test_both_are_declared_fields_off_by_default(engine) -> None:
    merging, cache = engine.fields[TOKENS], engine.fields[CACHE]
    assert (merging.kind, merging.default, merging.minimum, merging.maximum) == ("float", 0.0, 0.0, 0.9)
    assert (cache.kind, cache.default, cache.minimum) == ("int", 1, 1)
    assert merging.infotext == "Token merging ratio" and cache.infotext == "DeepCache interval"
    assert merging.flag == "--token-merging-ratio" and cache.flag == "--deep-cache-interval"
    assert merging.plugin == "webui.builtin.token_merging" and cache.plugin == "webui.builtin.deep_cache"


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        (TOKENS, 0.95, "token_merging_ratio must be between 0 and 0.9"),
        (TOKENS, -0.1, "token_merging_ratio must be between 0 and 0.9"),
        (TOKENS, "half", "token_merging_ratio must be a number"),
        (TOKENS, True, "token_merging_ratio must be a number"),
        (TOKENS, float("nan"), "token_merging_ratio must be"),
        (CACHE, 0, "deep_cache_interval must be between 1 and 10"),
        (CACHE, 11, "deep_cache_interval must be between 1 and 10"),
        (CACHE, 2.5, "deep_cache_interval must be a whole number"),
        (CACHE, "two", "deep_cache_interval must be a whole number"),
        (CACHE, True, "deep_cache_interval must be a whole number"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(engine, bundle, field, bad, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        generate(engine, bundle, {field: bad})


def test_the_infotext_records_both_and_png_info_reads_them_back(engine, bundle) -> None:
    result = generate(engine, bundle, {TOKENS: 0.5, CACHE: 3}, steps=3)
    text = result.infotexts[0]
    assert "Token merging ratio: 0.5" in text and "DeepCache interval: 3" in text
    values, notes = engine.fields.from_infotext(parse_infotext(text))
    assert values[TOKENS] == 0.5 and values[CACHE] == 3 and notes == []
    plain = generate(engine, bundle, steps=3).infotexts[0]
    assert "Token merging" not in plain and "DeepCache" not in plain
    values, _ = engine.fields.from_infotext(parse_infotext(plain))
    assert values.get(TOKENS, 0.0) == 0.0 and values.get(CACHE, 1) == 1


# -- token merging ------------------------------------------------------------------------------


def test_merge_and_unmerge_keep_every_token_in_place() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 64, 8)
    src, dst = partition(8, 8, [1, 2], tokens.device)
    assert src.shape == (2, 48) and dst.shape == (2, 16)
    assert not torch.equal(dst[0], dst[1])  # each row its own seed
    for row in range(2):  # one destination per 2x2 cell
        cells = {(int(i) // 8 // 2, int(i) % 8 // 2) for i in dst[row]}
        assert len(cells) == 16
        assert sorted(torch.cat([src[row], dst[row]]).tolist()) == list(range(64))
    assert torch.equal(Merge(tokens, src, dst, 0).unmerge(Merge(tokens, src, dst, 0).merge(tokens)), tokens)
    merge = Merge(tokens, src, dst, 20)
    merged = merge.merge(tokens)
    assert merged.shape == (2, 44, 8)
    back = merge.unmerge(merged)
    moved = src.gather(1, merge.merged)  # the merged sources take their destination's value
    joined = dst.gather(1, merge.target)
    for row in range(2):
        assert torch.equal(back[row, moved[row]], back[row, joined[row]])
        kept = src[row, merge.kept[row]]
        assert torch.equal(back[row, kept], tokens[row, kept])  # the others are untouched
        # a destination holds the mean of itself and the sources merged into it
        target = int(joined[row, 0])
        group = [target] + [int(i) for i, j in zip(moved[row], joined[row], strict=True) if int(j) == target]
        torch.testing.assert_close(back[row, target], tokens[row, group].mean(0))
    assert Merge(tokens, src, dst, 10_000).count == 48  # at most every source
    src, dst = partition(5, 7, [3], tokens.device)  # odd sides: the last row and column are sources
    assert dst.shape == (1, 2 * 3) and src.shape == (1, 35 - 6)
    assert all(int(i) // 7 < 4 and int(i) % 7 < 6 for i in dst[0])


def test_the_highest_resolution_attention_level_is_chosen(bundle, sdxl_bundle) -> None:
    # the tiny SD UNet's first level has no attention: its second level (down 1, up 0) is merged
    unet = bundle.unet
    targets = merge_targets(unet)
    assert [t for t, _ in targets] == [*unet.down_blocks[1].attentions, *unet.up_blocks[0].attentions]
    assert all(a is b.attn1 for t, attns in targets for a, b in zip(attns, t.transformer_blocks, strict=True))
    sdxl = merge_targets(sdxl_bundle.unet)
    assert sum(len(attns) for _, attns in sdxl) == 2 * 2 + 3 * 2  # two layers per transformer


def test_token_merging_off_is_exact_on_is_close_and_the_model_is_unchanged(engine, bundle) -> None:
    unet = bundle.unet
    hooks = hook_count(unet)
    exact = pixels(generate(engine, bundle))
    assert np.array_equal(exact, pixels(generate(engine, bundle, {TOKENS: 0.0})))
    merged = pixels(generate(engine, bundle, {TOKENS: 0.5}))
    assert_close_not_equal(exact, merged)
    assert np.array_equal(merged, pixels(generate(engine, bundle, {TOKENS: 0.5})))  # reproducible
    assert psnr(exact, pixels(generate(engine, bundle, {TOKENS: 0.9}))) > CLOSE_DB
    assert hook_count(unet) == hooks  # every hook removed
    assert np.array_equal(exact, pixels(generate(engine, bundle)))


def test_the_self_attention_runs_on_fewer_tokens(engine, bundle) -> None:
    seen: list[int] = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            seen.append(int(hidden_states.shape[1]))
            return super().__call__(attn, hidden_states, *args, **kwargs)

    attention = merge_targets(bundle.unet)[0][1][0]
    before = attention.processor
    attention.set_processor(Recording())
    try:
        generate(engine, bundle, steps=2)
        plain, seen[:] = list(seen), []
        generate(engine, bundle, {TOKENS: 0.5}, steps=2)
    finally:
        attention.set_processor(before)
    # 64x64 images, 32x32 latents: 16x16 = 256 tokens at the merged level, half of them merged
    assert plain == [256, 256] and seen == [128, 128]


def test_each_image_of_a_batch_merges_as_it_would_alone(engine, bundle) -> None:
    batch = generate(engine, bundle, {TOKENS: 0.5}, batch_size=2, steps=3)
    alone = generate(engine, bundle, {TOKENS: 0.5}, seed=5, steps=3)
    # as close as without merging (a batch's arithmetic differs in the last bits); another partition
    # of the tokens would differ by about 1e-2
    assert np.allclose(pixels(batch)[1], pixels(alone)[0], atol=1e-5)


def test_token_merging_on_the_sliced_attention_backend(engine, bundle) -> None:
    sliced = Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]),
        memory=MemorySettings(attention="sliced"),
    )
    default = pixels(generate(engine, bundle, {TOKENS: 0.5}, steps=3))
    other = pixels(generate(sliced, bundle, {TOKENS: 0.5}, steps=3))
    assert np.allclose(default, other, atol=1e-4)
    assert not np.array_equal(other, pixels(generate(sliced, bundle, steps=3)))


def test_token_merging_on_sdxl_and_inpainting_unets(engine, sdxl_bundle, inpaint_bundle) -> None:
    for model in (sdxl_bundle, inpaint_bundle):
        exact = pixels(generate(engine, model, steps=3))
        assert_close_not_equal(exact, pixels(generate(engine, model, {TOKENS: 0.5}, steps=3)))
        assert np.array_equal(exact, pixels(generate(engine, model, steps=3)))


# -- DeepCache ----------------------------------------------------------------------------------


def deep_blocks(unet) -> list[torch.nn.Module]:
    return [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]


def test_deep_cache_off_is_exact_on_is_close_and_skips_the_deep_blocks(engine, bundle) -> None:
    unet = bundle.unet
    hooks = hook_count(unet)
    with Counter(unet.mid_block) as deep, Counter(unet.up_blocks[-1]) as top:
        exact = pixels(generate(engine, bundle))
    assert (deep.calls, top.calls) == (6, 6)
    assert np.array_equal(exact, pixels(generate(engine, bundle, {CACHE: 1})))
    with Counter(unet.mid_block) as deep, Counter(unet.up_blocks[-1]) as top:
        cached = pixels(generate(engine, bundle, {CACHE: 3}))
    assert (deep.calls, top.calls) == (2, 6)  # full steps 0 and 3; the top level on every step
    assert_close_not_equal(exact, cached)
    assert np.array_equal(cached, pixels(generate(engine, bundle, {CACHE: 3})))  # reproducible
    assert psnr(exact, pixels(generate(engine, bundle, {CACHE: 2}))) > psnr(exact, cached)
    assert "forward" not in unet.__dict__ and hook_count(unet) == hooks
    assert np.array_equal(exact, pixels(generate(engine, bundle)))


@pytest.mark.parametrize("kind", ["sd", "inpaint", "sdxl", "controlnet"])
def test_the_shallow_branch_equals_the_full_unet_on_the_same_input(
    kind, bundle, inpaint_bundle, sdxl_bundle, controlnet_bundle
) -> None:
    """With the features kept from the same input, the shallow branch gives the full UNet's output:
    it reproduces the top level of the forward exactly (time and added embeddings, skips, ControlNet
    residuals), so a cached step differs only by the features' age."""
    model = {"sd": bundle, "inpaint": inpaint_bundle, "sdxl": sdxl_bundle, "controlnet": controlnet_bundle}[
        kind
    ]
    unet = model.unet
    generator = torch.Generator().manual_seed(0)
    batch = 2
    channels = unet.config.in_channels
    sample = torch.randn(batch, channels, 32, 32, generator=generator)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    kwargs: dict = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        }
    if kind == "controlnet":
        down, mid = model.controlnets["seg"](
            sample,
            500,
            encoder_hidden_states=hidden,
            controlnet_cond=torch.rand(batch, 3, 64, 64, generator=generator),
            return_dict=False,
        )
        kwargs.update(down_block_additional_residuals=list(down), mid_block_additional_residual=mid)
    cache = DeepCache(unet, 2)
    with torch.no_grad():
        plain = unet(sample, 500, hidden, return_dict=False, **kwargs)[0]
        cache.attach()
        try:
            cache.start_step(0)
            full = unet(sample, 500, hidden, return_dict=False, **kwargs)[0]
            cache.start_step(1)
            with Counter(*deep_blocks(unet)) as deep:
                shallow = unet(sample, 500, hidden, return_dict=False, **kwargs)[0]
                as_output = unet(sample, 500, hidden, **kwargs).sample
        finally:
            cache.end_step()
            cache.detach()
    assert torch.equal(plain, full)
    assert (cache.full_calls, cache.shallow_calls, deep.calls) == (1, 2, 0)
    torch.testing.assert_close(shallow, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(shallow, as_output)
    assert "forward" not in unet.__dict__ and cache.features is None


def test_deep_cache_with_cfg_off_controlnet_inpainting_and_sdxl(
    engine, controlnet_bundle, inpaint_bundle, sdxl_bundle
) -> None:
    runs = [
        (controlnet_bundle, dict(cfg_scale=1.0)),  # no guidance: the conditional half alone
        (controlnet_bundle, dict(task="seg2img", seg_map=seg_map())),
        (
            inpaint_bundle,
            dict(task="inpaint", init_image=random_image(8), mask=rect_mask(), mask_blur=0, strength=1.0),
        ),
        (sdxl_bundle, {}),
    ]
    for model, changes in runs:
        exact = pixels(generate(engine, model, **changes))
        with Counter(model.unet.mid_block) as deep:
            cached = generate(engine, model, {CACHE: 2}, **changes)
        assert deep.calls == 3, changes
        assert_close_not_equal(exact, pixels(cached))
        assert "DeepCache interval: 2" in cached.infotexts[0] and "DeepCache note" not in cached.infotexts[0]
        assert np.array_equal(exact, pixels(generate(engine, model, **changes)))


def test_both_together_and_with_a_batch(engine, bundle) -> None:
    exact = pixels(generate(engine, bundle, batch_size=2))
    both = pixels(generate(engine, bundle, {TOKENS: 0.5, CACHE: 2}, batch_size=2))
    assert_close_not_equal(exact, both)
    assert np.array_equal(exact, pixels(generate(engine, bundle, batch_size=2)))


def test_a_call_the_shallow_branch_cannot_take_runs_in_full_and_says_so(bundle) -> None:
    unet = bundle.unet
    sample, hidden = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    cache = DeepCache(unet, 2)
    with torch.no_grad():
        cache.attach()
        try:
            cache.start_step(1)  # nothing kept yet
            first = unet(sample, 10, hidden, return_dict=False)[0]
            cache.start_step(3)
            with Counter(unet.mid_block) as deep:
                unet(sample, 10, hidden, return_dict=False, cross_attention_kwargs={})
                unet(torch.randn(2, 4, 32, 32), 10, torch.randn(2, 77, 32), return_dict=False)
        finally:
            cache.detach()
    assert deep.calls == 2 and cache.shallow_calls == 0 and torch.isfinite(first).all()
    assert cache.fallbacks == {
        "no features kept yet": 1,
        "UNet input cross_attention_kwargs": 1,
        "the batch or size changed since the last full step": 1,
    }
    parameters: dict = {}
    context = SimpleNamespace(state={deep_cache.STATE: cache})
    deep_cache.write_metadata(parameters=parameters, image=None, request=None, context=context)
    assert parameters["DeepCache note"].startswith("3 cached steps ran in full (")


def test_a_unet_without_deeper_levels_is_refused(engine, components) -> None:
    torch.manual_seed(0)
    flat = UNet2DConditionModel(
        block_out_channels=(32,),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32,
    ).eval()
    model = bundle_from({**components, "unet": flat})
    with pytest.raises(
        InvalidRequestError, match="deep_cache_interval: .* single resolution level.*set it to 1"
    ):
        generate(engine, model, {CACHE: 2}, steps=2)
    assert deep_cache.unsupported(SimpleNamespace()) is not None
    assert np.isfinite(pixels(generate(engine, model, {TOKENS: 0.5}, steps=2))).all()
    assert token_merging.merge_targets(SimpleNamespace()) == []
