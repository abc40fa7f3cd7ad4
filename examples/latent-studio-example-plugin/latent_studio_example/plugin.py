"""The plugin module named by the ``latent_studio`` entry point."""

from __future__ import annotations

from typing import Any

from diffusers import EulerDiscreteScheduler

from webui.api import GenerationRequest, OutputImage, RunContext, hookimpl

LATENT_STUDIO_API = 1  # the plugin API versions this plugin is written for

STYLES = {
    "watercolor": "watercolor painting, soft edges, paper texture",
    "blueprint": "technical blueprint, white lines on blue",
}


@hookimpl
def register_schedulers(register: Any) -> None:
    register("Euler Trailing", EulerDiscreteScheduler, timestep_spacing="trailing")


def styled(prompt: str, style: str) -> str:
    """``prompt`` with the words of ``style`` appended (a name from STYLES, or the words themselves);
    a prompt that already ends with them (sent back from PNG Info) is left as it is."""
    words = STYLES.get(style, style)
    if prompt.rstrip().endswith(words):
        return prompt
    return f"{prompt}, {words}" if prompt.strip() else words


@hookimpl
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    """Restyle the prompt before anything is encoded: the built-in text conditioning then encodes
    the styled prompt (emphasis, long prompts and embeddings included) and the infotext records it."""
    style = request.extra.get("style")
    if style:
        request.prompt = styled(request.prompt, str(style))


@hookimpl
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    if request.extra.get("style"):
        parameters["Style"] = request.extra["style"]
