"""Built-in prompt reading: for a model that ships a prompt reader (``reader/`` in its folder, as the
default model does; :mod:`webui.engine.reader`), text-to-image draws the scene the reader reads in
the prompt, in the words the model was trained on.

One object: the prompt's embeddings are replaced by those of the model's own caption of the scene
the reader read ("blue background, big red circle in the upper left corner" is drawn as "a large
red circle at the top left on a blue background").

Two objects: the model draws one shape well but does not bind two shapes' colours to the right
places, so the pair is drawn in two passes of the one denoising loop: the left (top) shape alone
at its place, then, as a second pass, the right (bottom) shape inpainted into its half of the first
image by the model's inpainting UNet; the first shape's half is kept exactly.

The reading applies when the request field ``read_prompt`` is on (the default), the task is
text-to-image without a hires fix, the prompt fits the reader's window and every head the scene
needs is at least :data:`CONFIDENCE` sure; otherwise the prompt is used as it is. The infotext
records what was read (``Prompt reading: large red circle left of small blue square``); pasting
it back reads the same prompt again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from webui.api import (
    READER_WINDOW,
    Conditioning,
    GenerationRequest,
    OutputImage,
    Reading,
    RunContext,
    SecondPass,
    encode_prompts,
    hookimpl,
    read_prompt_states,
    tensor_to_images,
)

LATENT_STUDIO_API = 1
FIELD = "read_prompt"
INFOTEXT = "Prompt reading"
STATE = "layout"  # RunContext.state: the request's Layout (or None: the prompt as it is)
SECOND = "layout_second_pass"  # RunContext.state: (batch index, its first-pass pixels) for its second pass
CONFIDENCE = 0.5
# where each slot of a pair goes: side by side, or one above the other
PLACES = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    register(
        FIELD,
        "bool",
        default=True,
        label="Read the prompt",
        tasks=("txt2img",),
        help="for models with a prompt reader (the default model): draw the scene it reads in the "
        "prompt, two objects in two passes",
        record="hook",
    )


@dataclass
class Layout:
    """A request's reading and the captions it is drawn from (one, or one per pass)."""

    reading: Reading
    captions: list[str]
    embeds: torch.Tensor  # (len(captions), T, D): the captions' prompt embeddings

    @property
    def pair(self) -> bool:
        return len(self.captions) == 2

    def describe(self) -> str:
        r = self.reading
        first = f"{r['a_size']} {r['a_color']} {r['a_shape']}"
        if not self.pair:
            return f"{first} at the {r['position']} on {r['background']}"
        second = f"{r['b_size']} {r['b_color']} {r['b_shape']}"
        relation = "left of" if r["axis"] == "horizontal" else "above"
        return f"{first} {relation} {second} on {r['background']}"


def captions_of(reading: Reading) -> list[str]:
    """The model's own captions of a reading: the scene's, or one per object of a pair (each at its
    place: the middle row for side by side, the middle column for one above the other). The
    default model's caption template (``training.shapes.Scene.caption``, which the web app does not
    import; tests keep the two the same)."""

    def caption(slot: str, position: str) -> str:
        where = "in the center" if position == "center" else f"at the {position}"
        return (
            f"a {reading[slot + '_size']} {reading[slot + '_color']} {reading[slot + '_shape']} {where} "
            f"on a {reading['background']} background"
        )

    if reading.objects == 1:
        return [caption("a", reading["position"])]
    low, high = PLACES[reading["axis"]]
    return [caption("a", low), caption("b", high)]


def applies(request: GenerationRequest, context: RunContext) -> bool:
    reader = getattr(context.bundle, "reader", None)
    extra = request.extra
    return (
        reader is not None
        and request.task == "txt2img"
        and bool(extra.get(FIELD, True))
        and not extra.get("enable_hr")
        and request.init_image is None
        and request.mask is None
    )


def layout_for(request: GenerationRequest, context: RunContext, prompt_embeds: torch.Tensor) -> Layout | None:
    """The request's layout, read once per request (None: use the prompt as it is)."""
    if STATE in context.state:
        return context.state[STATE]
    layout = None
    if applies(request, context) and prompt_embeds.shape[1] <= READER_WINDOW:
        reading = read_prompt_states(context.bundle.reader, prompt_embeds)
        if reading.least_confidence >= CONFIDENCE:
            captions = captions_of(reading)
            embeds, _ = encode_prompts(
                context.bundle,
                captions,
                [""] * len(captions),
                device=context.device,
                dtype=context.dtype,
            )
            layout = Layout(reading, captions, embeds.embeds)
    context.state[STATE] = layout
    return layout


def second_mask(layout: Layout, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W): 1 on the half of the image the pair's second shape is drawn in."""
    mask = torch.zeros(1, 1, height, width)
    if layout.reading["axis"] == "horizontal":
        mask[..., width // 2 :] = 1
    else:
        mask[..., height // 2 :, :] = 1
    return mask


@hookimpl(trylast=True)
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    if conditioning.prompt_embeds is None:
        return
    layout = layout_for(request, context, conditioning.prompt_embeds)
    if layout is None:
        return
    first_pixels = _first_pass(context)
    index = 0 if first_pixels is None else 1
    conditioning.prompt_embeds = layout.embeds[index : index + 1].to(conditioning.prompt_embeds)
    if first_pixels is not None:  # the pair's second pass: inpaint the second shape's half
        mask = second_mask(layout, context.height, context.width)
        conditioning.mask = mask
        conditioning.masked_image = (first_pixels * (1 - mask)).to(context.device)


def _first_pass(context: RunContext) -> torch.Tensor | None:
    """The first pass's pixels while this batch's second pass runs, else None."""
    entry = context.state.get(SECOND)
    return entry[1] if entry is not None and entry[0] == context.batch_index else None


@hookimpl
def second_pass(request: GenerationRequest, context: RunContext, latents: torch.Tensor) -> SecondPass | None:
    layout = context.state.get(STATE)
    if layout is None or not layout.pair or _first_pass(context) is not None:
        return None
    pixels = context.engine.decode_latents(context.bundle, latents).float().cpu()
    context.state[SECOND] = (context.batch_index, pixels)
    return SecondPass(request=request.replace(strength=1.0), latents=latents)


@hookimpl
def postprocess_images(images: list[OutputImage], request: GenerationRequest, context: RunContext) -> None:
    """A pair's first shape's half exactly as the first pass drew it."""
    layout, first = context.state.get(STATE), _first_pass(context)
    context.state.pop(SECOND, None)
    if layout is None or first is None:
        return
    mask = second_mask(layout, context.height, context.width)
    for k, item in enumerate(images):
        if item.pixels is None:
            continue
        kept = first[k] / 2 + 0.5
        item.pixels = torch.where(mask[0].bool(), item.pixels, kept.clamp(0, 1))
        item.image = tensor_to_images(item.pixels.unsqueeze(0) * 2 - 1)[0]


@hookimpl
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    layout = context.state.get(STATE)
    if layout is not None:
        parameters[INFOTEXT] = layout.describe()
