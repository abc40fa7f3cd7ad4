"""Built-in CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", section 3.4), a wrapper of the guidance step.

High CFG scales over-expose images, worst with zero-terminal-SNR models. The guided prediction is
scaled back to the spread of the text-conditioned one: with ``std`` taken over every dimension but
the batch, ``rescaled = cfg * std(text) / std(cfg)``, and the result is ``f * rescaled + (1 - f) * cfg``
for the factor ``f`` in [0, 1] (diffusers' ``guidance_rescale``, the same formula). The factor is
the request field ``cfg_rescale`` (0, the default, is off), declared with ``register_fields``, so
its control, command-line flag, infotext entry (``CFG rescale: f`` when it is on) and PNG Info's
"Send to" come from that one declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from webui.api import (
    DenoiseStep,
    GenerationRequest,
    GuidanceCombine,
    RunContext,
    hookimpl,
)

LATENT_STUDIO_API = 1
FIELD = "cfg_rescale"  # the request field (request.extra["cfg_rescale"])


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    # declared once: the request value, the control next to the CFG scale, --cfg-rescale, the
    # "CFG rescale" infotext entry when it is on, and PNG Info's "Send to" all come from here
    register(
        FIELD,
        "float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        label="CFG rescale",
        group="sampling",
        help="pull over-exposed high-CFG images back (0 = off, 0.7 is typical)",
        infotext="CFG rescale",
    )


def rescale_factor(request: GenerationRequest) -> float:
    """The request's CFG rescale factor (0 when it is off)."""
    return float(request.extra.get(FIELD) or 0.0)


def rescale(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """``guided`` brought back towards the spread of ``text`` by ``factor`` (see the module text)."""
    dims = list(range(1, text.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_text / std_cfg)
    return factor * rescaled + (1 - factor) * guided


@hookimpl
def wrap_guidance(request: GenerationRequest, context: RunContext) -> Any:
    factor = rescale_factor(request)
    if factor <= 0:
        return None

    def wrap(combine: GuidanceCombine) -> GuidanceCombine:
        def rescaled(
            uncond: torch.Tensor, cond: torch.Tensor, scale: float, step: DenoiseStep
        ) -> torch.Tensor:
            return rescale(combine(uncond, cond, scale, step), cond, factor)

        return rescaled

    return wrap
