"""Built-in LoRAs: the prompt's ``<lora:name:weight>`` tags, applied as a model patch.

In ``patch_model`` the prompt's tags are looked up and read (an unknown name fails the request before
anything runs) and :func:`~webui.api.apply_loras` is handed to the engine, which applies the LoRAs
under the model's lock and removes them when the request ends, also on an error or an interrupt.
The image's ``parameters`` get A1111's ``Lora hashes`` (see :mod:`webui.engine.lora`).
"""

from __future__ import annotations

from webui.api import (
    Conditioning,
    GenerationRequest,
    ModelPatches,
    RunContext,
    apply_loras,
    hookimpl,
    lora_metadata,
    prompt_loras,
)

LATENT_STUDIO_API = 1
STATE_KEY = "loras"  # RunContext.state: the request's LoRAs (webui.engine.lora's LoraRequest list)


@hookimpl
def patch_model(request: GenerationRequest, context: RunContext, patches: ModelPatches) -> None:
    loras = prompt_loras(request.prompt, context.engine.models)
    context.state[STATE_KEY] = loras
    if loras:
        patches.enter("lora", apply_loras(context.bundle, loras))


@hookimpl(trylast=True)
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    for key, value in lora_metadata(context.state.get(STATE_KEY) or []).items():
        conditioning.metadata.setdefault(key, value)
