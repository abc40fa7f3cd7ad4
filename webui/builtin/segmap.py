"""Built-in segmentation-map conditioning: a colour-coded class map → a ControlNet.

The map's colours are snapped to the ControlNet's palette (nearest colour, so anti-aliased or
slightly-off colours still map to a class) and resized with nearest-neighbour sampling. The
palette is the ControlNet's own ``palette.json`` when it ships one, otherwise ADE20K's 150-class
palette, which the public ``sd-controlnet-seg`` model was trained on.
"""

from __future__ import annotations

from typing import Any

from webui.api import (
    ADE20K,
    Conditioning,
    ControlInput,
    GenerationRequest,
    InvalidRequestError,
    Palette,
    RunContext,
    control_image_tensor,
    hookimpl,
    snap_to_palette,
)

LATENT_STUDIO_API = 1


def palette_of(controlnet: Any) -> Palette:
    """The palette a segmentation ControlNet was trained with."""
    palette = getattr(controlnet, "seg_palette", None)
    return palette if isinstance(palette, Palette) else ADE20K


@hookimpl
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    if request.seg_map is None:
        return
    if request.controlnet:
        model = context.engine.models.get_controlnet(request.controlnet)
        name = request.controlnet
    else:
        model = context.bundle.controlnets.get("seg")
        name = f"{context.bundle.name}/controlnet"
    if model is None:
        raise InvalidRequestError(
            "a segmentation map needs a segmentation ControlNet: this model ships none, so choose one "
            "with --controlnet (a ControlNet folder, e.g. models/controlnet/sd-controlnet-seg)"
        )
    palette = palette_of(model)
    snapped, _, off_palette = snap_to_palette(request.seg_map, palette)
    image = control_image_tensor(snapped, context.width, context.height)
    conditioning.controls.append(
        ControlInput(
            model=model,
            image=image,
            scale=request.control_scale,
            start=request.control_start,
            end=request.control_end,
            name="seg",
        )
    )
    conditioning.metadata["ControlNet 0"] = (
        f"Module: seg, Model: {name}, Weight: {request.control_scale:g}, "
        f"Guidance Start: {request.control_start:g}, Guidance End: {request.control_end:g}"
    )
    if off_palette:
        context.state.setdefault("warnings", []).append(
            f"{off_palette} segmentation-map pixels were not palette colours and were mapped to the nearest class"
        )
