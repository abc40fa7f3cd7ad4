"""The plugin module named by the ``latent_studio`` entry point."""

from __future__ import annotations

from typing import Any

from diffusers import EulerDiscreteScheduler

from webui.api import Conditioning, GenerationRequest, OutputImage, RunContext, encode_prompts, hookimpl

STYLES = {
    "watercolor": "watercolor painting, soft edges, paper texture",
    "blueprint": "technical blueprint, white lines on blue",
}


@hookimpl
def register_schedulers(register: Any) -> None:
    register("Euler Trailing", EulerDiscreteScheduler, timestep_spacing="trailing")


@hookimpl(trylast=True)  # after the built-in text conditioning has run
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    style = request.extra.get("style")
    if not style:
        return
    words = STYLES.get(style, style)
    positive, negative = encode_prompts(
        context.bundle, [f"{request.prompt}, {words}"], [request.negative_prompt],
        clip_skip=request.clip_skip, device=context.device, dtype=context.dtype,
    )
    conditioning.prompt_embeds = positive.embeds
    conditioning.negative_prompt_embeds = negative.embeds  # same chunk count as the positive side
    if positive.pooled is not None:
        conditioning.pooled_prompt_embeds = positive.pooled


@hookimpl
def write_metadata(parameters: dict[str, Any], image: OutputImage, request: GenerationRequest,
                   context: RunContext) -> None:
    if request.extra.get("style"):
        parameters["Style"] = request.extra["style"]
