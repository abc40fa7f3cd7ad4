"""The example plugin's tests, written with Latent Studio's testing kit (``webui.testing``)."""

from __future__ import annotations

import numpy as np
import pytest
from latent_studio_example import plugin

from webui.api import GenerationRequest
from webui.testing import check_hooks, make_engine, run_task

TASKS = ("txt2img", "img2img", "inpaint", "seg2img")


@pytest.fixture(scope="module")
def engine():
    return make_engine(plugin)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def test_hooks_fit_the_contract():
    check_hooks(plugin)


def test_the_sampler_is_registered(engine):
    assert engine.schedulers.get("Euler Trailing").overrides == {"timestep_spacing": "trailing"}
    result = run_task(engine, "txt2img", sampler="Euler Trailing")
    assert "Sampler: Euler Trailing" in result.infotexts[0]


def test_prepare_request_restyles_the_prompt():
    request = GenerationRequest(prompt="a cat", extra={"style": "watercolor"})
    plugin.prepare_request(request=request, context=None)
    assert request.prompt == "a cat, watercolor painting, soft edges, paper texture"
    plugin.prepare_request(request=request, context=None)  # already styled (e.g. sent from PNG Info)
    assert request.prompt == "a cat, watercolor painting, soft edges, paper texture"
    own = GenerationRequest(prompt="a cat", extra={"style": "oil on canvas"})
    plugin.prepare_request(request=own, context=None)
    assert own.prompt == "a cat, oil on canvas"
    plain = GenerationRequest(prompt="a cat")
    plugin.prepare_request(request=plain, context=None)
    assert plain.prompt == "a cat"


@pytest.mark.parametrize("task", TASKS)
def test_each_task_is_styled_and_records_the_style(engine, task):
    plain = run_task(engine, task, prompt="a cat")
    styled = run_task(engine, task, prompt="a cat", extra={"style": "blueprint"})
    assert styled.images[0].image.size == (64, 64)
    text = styled.infotexts[0]
    assert text.startswith("a cat, technical blueprint, white lines on blue\n")
    assert "Style: blueprint" in text
    assert "Style:" not in plain.infotexts[0]
    assert np.abs(pixels(plain) - pixels(styled)).max() > 0  # the styled prompt was what got encoded


def test_the_styled_prompt_is_encoded_like_the_same_words_typed(engine):
    styled = run_task(engine, "txt2img", prompt="a cat", extra={"style": "blueprint"})
    typed = run_task(engine, "txt2img", prompt="a cat, technical blueprint, white lines on blue")
    assert np.array_equal(pixels(styled), pixels(typed))
