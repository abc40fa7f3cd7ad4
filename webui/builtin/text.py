"""Built-in text conditioning: prompt and negative prompt → embeddings (SDXL: pooled + time ids).

Long prompts are encoded in chunks of the encoder's window and concatenated; A1111's emphasis
syntax ``(word:1.3)``, ``(word)``, ``[word]`` and ``BREAK`` are honoured, and the request's
textual-inversion embeddings (``context.state["embeddings"]``, set by the ``webui.builtin.embeddings``
plugin) replace their names (see :mod:`webui.engine.text`).
"""

from __future__ import annotations

import torch

from webui.api import EMBEDDINGS_STATE, Conditioning, GenerationRequest, RunContext, encode_prompts, hookimpl

LATENT_STUDIO_API = 1


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
            embeddings=context.state.get(EMBEDDINGS_STATE),
            max_chunks=getattr(getattr(context.engine, "limits", None), "max_prompt_chunks", 0),
            should_stop=context.control.check,  # an interrupt stops a long prompt within a chunk
        )
    positive, negative = context.state["text"]
    conditioning.prompt_embeds = positive.embeds
    conditioning.negative_prompt_embeds = negative.embeds
    if bundle.is_sdxl:
        conditioning.pooled_prompt_embeds = positive.pooled
        conditioning.negative_pooled_prompt_embeds = negative.pooled
        size = [context.height, context.width]
        if (
            bundle.time_id_count == 5
        ):  # the refiner: original size, crop, aesthetic score (diffusers' defaults)
            positive_ids = size + [0, 0, float(bundle.config.get("aesthetic_score", 6.0))]
            negative_ids = size + [0, 0, float(bundle.config.get("negative_aesthetic_score", 2.5))]
        else:  # the base model: original size, crop, target size
            positive_ids = negative_ids = size + [0, 0] + size
        conditioning.add_time_ids = torch.tensor([positive_ids], device=context.device, dtype=context.dtype)
        conditioning.negative_add_time_ids = torch.tensor(
            [negative_ids], device=context.device, dtype=context.dtype
        )
    if request.clip_skip > 1:
        conditioning.metadata["Clip skip"] = request.clip_skip
