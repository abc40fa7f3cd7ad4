"""Built-in CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", section 3.4), a wrapper of the guidance step.

High CFG scales over-expose images, worst with zero-terminal-SNR models. The guided prediction is
scaled back to the spread of the text-conditioned one: with ``std`` taken over every dimension but
the batch, ``rescaled = cfg * std(text) / std(cfg)``, and the result is ``f * rescaled + (1 - f) * cfg``
for the factor ``f`` in [0, 1] (diffusers' ``guidance_rescale``, the same formula). The factor is
``request.extra["cfg_rescale"]`` (0, the default, is off); the image's ``parameters`` get
``CFG rescale: f`` when it is on.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from webui.api import (
    DenoiseStep,
    GenerationRequest,
    GuidanceCombine,
    InvalidRequestError,
    OutputImage,
    RunContext,
    hookimpl,
)

LATENT_STUDIO_API = 1
FIELD = "cfg_rescale"  # the request.extra key
INFOTEXT_KEY = "CFG rescale"


def rescale_factor(request: GenerationRequest) -> float:
    """The request's CFG rescale factor (0 when not given); a bad value raises InvalidRequestError."""
    value = request.extra.get(FIELD, 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(f"cfg_rescale must be a number from 0 to 1 (0 = off), got {value!r:.40}")
    return float(value)


def rescale(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """``guided`` brought back towards the spread of ``text`` by ``factor`` (see the module text)."""
    dims = list(range(1, text.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_text / std_cfg)
    return factor * rescaled + (1 - factor) * guided


@hookimpl
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    rescale_factor(request)


@hookimpl
def wrap_guidance(request: GenerationRequest, context: RunContext) -> Any:
    factor = rescale_factor(request)
    if factor <= 0:
        return None

    def wrap(combine: GuidanceCombine) -> GuidanceCombine:
        def rescaled(uncond: torch.Tensor, cond: torch.Tensor, scale: float,
                     step: DenoiseStep) -> torch.Tensor:
            return rescale(combine(uncond, cond, scale, step), cond, factor)

        return rescaled

    return wrap


@hookimpl
def write_metadata(parameters: dict[str, Any], image: OutputImage, request: GenerationRequest,
                   context: RunContext) -> None:
    factor = rescale_factor(request)
    if factor > 0:
        parameters[INFOTEXT_KEY] = factor
