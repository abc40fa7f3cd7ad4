"""Built-in text conditioning: prompt and negative prompt → embeddings (SDXL: pooled + time ids).

Long prompts are encoded in chunks of the encoder's window and concatenated; A1111's emphasis
syntax ``(word:1.3)``, ``(word)``, ``[word]`` and ``BREAK`` are honoured (see
:mod:`webui.engine.text`).
"""

from __future__ import annotations

import torch

from webui.engine.context import Conditioning, RunContext
from webui.engine.text import encode_prompts
from webui.hookspecs import hookimpl
from webui.request import GenerationRequest


@hookimpl(tryfirst=True)
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    bundle = context.bundle
    if "text" not in context.state:  # encoded once per request, reused by every batch
        context.state["text"] = encode_prompts(
            bundle,
            [request.prompt],
            [request.negative_prompt],
            clip_skip=request.clip_skip,
            device=context.device,
            dtype=context.dtype,
        )
    positive, negative = context.state["text"]
    conditioning.prompt_embeds = positive.embeds
    conditioning.negative_prompt_embeds = negative.embeds
    if bundle.is_sdxl:
        conditioning.pooled_prompt_embeds = positive.pooled
        conditioning.negative_pooled_prompt_embeds = negative.pooled
        size = [context.height, context.width]
        time_ids = torch.tensor([size + [0, 0] + size], device=context.device, dtype=context.dtype)
        conditioning.add_time_ids = time_ids
        conditioning.negative_add_time_ids = time_ids
    if request.clip_skip > 1:
        conditioning.metadata["Clip skip"] = request.clip_skip
