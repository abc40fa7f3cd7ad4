"""The engine against diffusers' reference pipelines: the same components, sampler and seeds on both
sides, pixels compared (``TOLERANCE``). Shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch

from webui.request import GenerationRequest

TOLERANCE = 1e-3


def reference(pipe, sampler: str, engine, seeds: list[int], **kwargs) -> np.ndarray:
    pipe.scheduler = engine.schedulers.build(sampler, dict(pipe.scheduler.config), seed=seeds[0])
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(generator=generators, output_type="np", num_images_per_prompt=len(seeds), **kwargs).images


def ours(engine, bundle, **kwargs) -> np.ndarray:
    result = engine.generate(GenerationRequest(**kwargs), bundle=bundle)
    return np.stack([item.pixels.permute(1, 2, 0).numpy() for item in result.images])


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = float(np.abs(a - b).max())
    assert diff < TOLERANCE, f"max abs pixel difference {diff}"
    assert float(a.std()) > 0.01  # a real picture, not a constant
