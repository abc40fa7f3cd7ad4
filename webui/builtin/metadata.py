"""Built-in metadata: the standard A1111 ``parameters`` keys, and reading infotexts back."""

from __future__ import annotations

from typing import Any

from webui.api import GenerationRequest, OutputImage, RunContext, hookimpl, parse_infotext

LATENT_STUDIO_API = 1


@hookimpl(tryfirst=True)
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    parameters.update(
        {
            "Steps": request.steps,
            "Sampler": request.sampler,
            "CFG scale": request.cfg_scale,
            "Seed": image.seed,
            "Size": f"{context.width}x{context.height}",
            "Model hash": context.bundle.model_hash,
            "Model": context.bundle.name,
            # a separate VAE, as A1111 writes it (absent for the model's own VAE)
            "VAE hash": context.bundle.config.get("vae_hash"),
            "VAE": context.bundle.config.get("vae_name"),
        }
    )
    if request.eta:
        parameters["Eta"] = request.eta


@hookimpl(trylast=True)
def parse_metadata(text: str) -> dict[str, Any] | None:
    return parse_infotext(text)
