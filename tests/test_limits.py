"""Limits per request: what a server owner allows, checked before work starts, with messages that
name the limit and its flag; interrupting a long prompt while it is encoded."""

from __future__ import annotations

import pytest
from PIL import Image

from webui.cli import build_parser
from webui.engine.context import GenerationControl
from webui.engine.pipeline import Engine
from webui.errors import InvalidRequestError, ModelNotFoundError
from webui.limits import LIMIT_FLAGS, LimitExceeded, Limits
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

MODELS = "models"  # the shipped shapes model: 64x64, a 32-token MiniLM window (30 tokens a chunk)


def make_engine(**limits: int) -> Engine:
    return Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]),
        models_dir=MODELS,
        limits=Limits(**limits),
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine(max_prompt_chunks=3, max_pixels=96 * 96)


# -- before a model is loaded ---------------------------------------------------------------------

OVER_THE_LIMIT = {
    "prompt": (
        dict(prompt="x" * 10_001),
        "the prompt has 10001 characters, over this server's limit of 10000 (--max-prompt-chars)",
    ),
    "negative": (dict(negative_prompt=" " * 1_000_000), "the negative prompt has 1000000 characters"),
    "steps": (dict(steps=151), "151 steps were asked for, over this server's limit of 150 (--max-steps)"),
    "pixels": (
        dict(width=2048, height=2056),
        "2048x2056 is 4210688 pixels, over this server's limit of 4194304 (--max-pixels)",
    ),
    "batch": (
        dict(batch_size=8, batch_count=9),
        "8 x 9 = 72 images were asked for, over this server's limit of 64 (--max-batch)",
    ),
}


@pytest.mark.parametrize("case", list(OVER_THE_LIMIT))
def test_default_limits_refuse_before_the_model_is_looked_up(case):
    fields, message = OVER_THE_LIMIT[case]
    engine = make_engine()
    # the model does not exist: the limit is checked first, so no model is ever loaded for it
    with pytest.raises(LimitExceeded) as caught:
        engine.generate(GenerationRequest(model="no-such-model", **fields))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, InvalidRequestError)  # the web app and CLI show it as bad input


def test_at_the_limit_is_allowed_and_zero_means_no_limit():
    at_limit = GenerationRequest(
        model="no-such-model",
        prompt="x" * 10_000,
        steps=150,
        width=2048,
        height=2048,
        batch_size=8,
        batch_count=8,
    )
    with pytest.raises(ModelNotFoundError):  # past every limit check, on to the model
        make_engine().generate(at_limit)
    unlimited = make_engine(max_prompt_chars=0, max_steps=0, max_pixels=0, max_batch=0)
    with pytest.raises(ModelNotFoundError):
        unlimited.generate(
            GenerationRequest(
                model="no-such-model", prompt="x" * 50_000, steps=1000, batch_size=64, batch_count=100
            )
        )


def test_the_resolved_size_is_checked_too(engine):
    """img2img without a size takes the init image's: that size is held to --max-pixels as well."""
    request = GenerationRequest(
        task="img2img", init_image=Image.new("RGB", (128, 128), "red"), steps=2, strength=0.5
    )
    with pytest.raises(LimitExceeded, match=r"128x128 is 16384 pixels, .* of 9216 \(--max-pixels\)"):
        engine.generate(request)


def test_limits_refuse_negative_or_non_integer_values():
    with pytest.raises(InvalidRequestError, match="--max-steps must be a whole number >= 0"):
        Limits(max_steps=-1).validated()
    with pytest.raises(InvalidRequestError, match="--max-pixels"):
        Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), limits=Limits(max_pixels=1.5))


# -- text-encoder chunks ------------------------------------------------------------------------


def test_prompt_chunks_over_the_limit_are_refused_before_encoding(engine):
    bundle = engine.models.get(None)
    calls: list[int] = []
    handle = bundle.text_encoders[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(
            LimitExceeded,
            match=r"the negative prompt needs 4 chunks of 30 tokens, over this "
            r"server's limit of 3 \(--max-prompt-chunks\)",
        ):
            engine.generate(
                GenerationRequest(
                    prompt="a red circle", negative_prompt="a BREAK b BREAK c BREAK d", steps=2, seed=1
                )
            )
    finally:
        handle.remove()
    assert calls == []  # nothing was encoded
    three = engine.generate(GenerationRequest(prompt="a BREAK b BREAK red circle", steps=2, seed=1))
    assert len(three.images) == 1


def test_interrupt_takes_effect_while_a_long_prompt_is_encoded():
    engine = make_engine(max_prompt_chunks=0)
    bundle = engine.models.get(None)
    control = GenerationControl()
    encoded: list[int] = []

    def count_and_interrupt(*_: object) -> None:
        encoded.append(1)
        if len(encoded) == 2:
            control.interrupt()  # as the Interrupt button does, from another thread

    steps: list[int] = []
    handle = bundle.text_encoders[0].register_forward_hook(count_and_interrupt)
    try:
        prompt = " BREAK ".join(["a red circle"] * 40)  # 40 chunks
        result = engine.generate(
            GenerationRequest(prompt=prompt, steps=5, seed=1, batch_count=3),
            control=control,
            callback=lambda info: steps.append(info.step),
        )
    finally:
        handle.remove()
    assert len(encoded) == 2  # stopped before the third of 40 chunks
    assert result.interrupted and result.images == [] and steps == []


# -- flags --------------------------------------------------------------------------------------


def test_flags_set_the_limits_for_the_app_and_generate():
    args = build_parser().parse_args(["--max-prompt-chars", "500", "--max-steps", "30", "--max-pixels", "0"])
    limits = Limits.from_args(args)
    assert (limits.max_prompt_chars, limits.max_steps, limits.max_pixels) == (500, 30, 0)
    assert limits.max_batch == Limits().max_batch
    # repeated after the subcommand, and not reset by it when given before
    args = build_parser().parse_args(["--max-steps", "30", "generate", "--max-batch", "4"])
    assert (Limits.from_args(args).max_steps, Limits.from_args(args).max_batch) == (30, 4)
    assert set(LIMIT_FLAGS.values()) >= {"--max-prompt-chars", "--max-steps", "--max-pixels", "--max-batch"}


def test_a_negative_limit_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--max-steps", "-5"])
    assert exit_.value.code == 2
    assert "--max-steps: must be 0 (no limit) or more, got -5" in capsys.readouterr().err


def test_downloads_are_off_for_the_web_app_unless_allowed():
    assert build_parser().parse_args([]).allow_download is False
    assert build_parser().parse_args(["--allow-download"]).allow_download is True
