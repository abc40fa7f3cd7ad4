"""The plugin module named by the ``latent_studio`` entry point: the "Sketch to image" task.

What it declares, once each (the host derives the web UI tab and controls, the ``launch.py
generate`` options, the infotext entries and PNG Info's "Send to" from these declarations):

* the task ``sketch2img`` and its tab;
* its fields: the sketch (drawn on a canvas or uploaded), a photo to trace, the edge detector's
  thresholds, how to read the sketch's colours, and the ControlNet with its weight, start and end.

What it does with them: ``prepare_request`` checks the values that depend on each other and loads
the ControlNet (so a missing one fails before any step is computed); ``provide_conditioning``
turns the sketch and the photo into one white-on-black edge map (:mod:`latent_studio_sketch.edges`)
at the output size and adds it, with the ControlNet, to the request's conditioning.

The sketch and the photo combine: the photo's edges and the sketch's lines are merged, so lines
drawn on the canvas add to (or stand in for) what the detector finds in the photo. Either alone is
enough.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from webui.api import (
    Conditioning,
    ControlInput,
    Field,
    GenerationRequest,
    InvalidRequestError,
    ModelBundle,
    ModelNotFoundError,
    RunContext,
    control_image_tensor,
    hookimpl,
)

from .edges import INVERT_CHOICES, edge_map

LATENT_STUDIO_API = 1  # the plugin API versions this plugin is written for

TASK = "sketch2img"
STATE = "latent_studio_sketch"  # this plugin's RunContext.state key
CONTROLNET_EXAMPLE = "control_v11p_sd15_canny"

FIELDS: tuple[Field, ...] = (
    Field(
        "sketch",
        "image",
        tasks=(TASK,),
        widget="sketch",
        group="sketch",
        label="Sketch",
        help="draw lines on the canvas or upload a line drawing (dark on light or light on dark)",
    ),
    Field(
        "sketch_photo",
        "image",
        tasks=(TASK,),
        widget="upload",
        group="sketch",
        label="Photo to trace (optional)",
        help="its edges are found and merged with the sketch's lines; either alone is enough",
    ),
    Field(
        "sketch_low_threshold",
        "int",
        default=100,
        minimum=1,
        maximum=255,
        step=1,
        tasks=(TASK,),
        group="sketch_edges",
        label="Edge low threshold",
        help="photo edges weaker than this are dropped (Canny's low threshold)",
        infotext="Sketch low threshold",
    ),
    Field(
        "sketch_high_threshold",
        "int",
        default=200,
        minimum=1,
        maximum=255,
        step=1,
        tasks=(TASK,),
        group="sketch_edges",
        label="Edge high threshold",
        help="photo edges stronger than this are kept, with the weaker ones connected to them",
        infotext="Sketch high threshold",
    ),
    Field(
        "sketch_invert",
        "choice",
        default="auto",
        choices=INVERT_CHOICES,
        widget="radio",
        tasks=(TASK,),
        group="sketch_edges",
        label="Invert the sketch",
        help="ControlNets expect light lines on black: 'auto' inverts a sketch with a light background",
        infotext="Sketch invert",
    ),
    Field(
        "sketch_controlnet",
        "choice",
        choices="models:controlnet",
        nullable=True,
        tasks=(TASK,),
        group="sketch_control",
        label="Edges ControlNet",
        help=f"a canny, scribble or lineart ControlNet from models/controlnet (e.g. {CONTROLNET_EXAMPLE})",
        infotext="Sketch ControlNet",
    ),
    Field(
        "sketch_weight",
        "float",
        default=1.0,
        minimum=0.0,
        maximum=2.0,
        step=0.05,
        tasks=(TASK,),
        group="sketch_control",
        label="Sketch weight",
        help="how strongly the lines steer the image",
        infotext="Sketch weight",
    ),
    Field(
        "sketch_start",
        "float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        tasks=(TASK,),
        group="sketch_control",
        label="Sketch start",
        help="the lines steer from this fraction of the steps",
        infotext="Sketch start",
    ),
    Field(
        "sketch_end",
        "float",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        tasks=(TASK,),
        group="sketch_control",
        label="Sketch end",
        help="the lines steer until this fraction of the steps",
        infotext="Sketch end",
    ),
)
FIELD_NAMES: tuple[str, ...] = tuple(declared.name for declared in FIELDS)


@hookimpl
def register_tasks(register: Callable[..., Any]) -> None:
    # a sketch or a photo will do: checked before a model is loaded
    register(
        TASK,
        "Sketch to image",
        requires_any=("sketch", "sketch_photo"),
        message="sketch2img needs lines: draw or upload a sketch, or give a photo to trace",
        help="draw or upload lines (or trace a photo's edges) and generate through an edges ControlNet",
    )


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    for declared in FIELDS:
        register(declared)


@hookimpl
def register_ui_tabs(register: Callable[..., Any]) -> None:
    # a generation tab built by the host from the task's fields: no gradio here
    register(TASK, "Sketch to image", task=TASK, order=45)


@hookimpl
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    """For a sketch2img request: check what the field and task declarations cannot (the thresholds
    and the start and end are in order) and load the ControlNet once, for
    every batch of the request. Other tasks must not carry a sketch: it would be silently unused."""
    extra = request.extra
    if request.task != TASK:
        given = [name for name in ("sketch", "sketch_photo") if extra.get(name) is not None]
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise InvalidRequestError(
                f"{' and '.join(given)} {verb} used only by the {TASK} task; choose that task (--task {TASK})"
            )
        return
    low, high = extra["sketch_low_threshold"], extra["sketch_high_threshold"]
    if low > high:
        raise InvalidRequestError(
            f"sketch_low_threshold ({low}) must not be above sketch_high_threshold ({high})"
        )
    if extra["sketch_start"] > extra["sketch_end"]:
        raise InvalidRequestError(
            f"sketch_start ({extra['sketch_start']:g}) must not be after sketch_end ({extra['sketch_end']:g})"
        )
    name = extra.get("sketch_controlnet")
    controlnet = load_controlnet(name, context)
    check_fits(controlnet, name, context.bundle)
    context.state[STATE] = {"controlnet": controlnet}


@hookimpl
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    state = context.state.get(STATE)
    if request.task != TASK or state is None:
        return
    if "image" not in state:  # once per request (provide_conditioning runs for each batch)
        state["image"] = control_image_tensor(
            edges_for(request, context.width, context.height), context.width, context.height
        )
    extra = request.extra
    conditioning.controls.append(
        ControlInput(
            model=state["controlnet"],
            image=state["image"],
            scale=extra["sketch_weight"],
            start=extra["sketch_start"],
            end=extra["sketch_end"],
            name="sketch",
        )
    )
    # the infotext entries come from the fields' declarations (infotext=...): nothing to write here


def edges_for(request: GenerationRequest, width: int, height: int) -> Any:
    """The request's edge map (a PIL "L" image of ``width``×``height``): the sketch's lines merged
    with the photo's edges. Refuses a request whose sketch and photo give no line at all."""
    extra = request.extra
    image = edge_map(
        width,
        height,
        sketch=extra.get("sketch"),
        photo=extra.get("sketch_photo"),
        low=extra["sketch_low_threshold"],
        high=extra["sketch_high_threshold"],
        invert=extra["sketch_invert"],
    )
    if image.getextrema()[1] == 0:
        if extra.get("sketch_photo") is None:
            raise InvalidRequestError("the sketch is blank: draw some lines or upload a line drawing")
        thresholds = f"{extra['sketch_low_threshold']}/{extra['sketch_high_threshold']}"
        raise InvalidRequestError(
            "no lines to follow: the sketch is blank or missing and no edges were "
            f"found in the photo at thresholds {thresholds}; lower them or draw lines"
        )
    return image


def load_controlnet(name: str | None, context: RunContext) -> Any:
    """The ControlNet called ``name``, loaded (and cached) by the engine's model manager; a missing
    one fails with what to install where."""
    if not name:
        raise InvalidRequestError(
            f"sketch2img needs an edges ControlNet: put one (e.g. "
            f"{CONTROLNET_EXAMPLE}) into {controlnet_folder(context)} and choose it as "
            "the Edges ControlNet (--sketch-controlnet)"
        )
    try:
        return context.engine.models.get_controlnet(name)
    except ModelNotFoundError:
        folder = controlnet_folder(context)
        raise InvalidRequestError(
            f"no ControlNet named {name!r}: put an edges ControlNet folder or "
            f".safetensors file of that name into {folder}"
        ) from None


def check_fits(controlnet: Any, name: str, bundle: ModelBundle) -> None:
    """Refuse a ControlNet made for another model family (an SD 1.5 ControlNet with an SDXL model)
    with one line, before it fails deep inside the UNet with a shape error."""
    config = getattr(controlnet, "config", None)
    ours, theirs = getattr(config, "cross_attention_dim", None), bundle.unet.config.cross_attention_dim
    embedding = getattr(config, "conditioning_embedding_out_channels", None)
    downscale = 2 ** (len(embedding) - 1) if embedding else None
    if ours is not None and ours != theirs:
        problem = f"its text features are {ours} wide, the model's {theirs}"
    elif downscale is not None and downscale != bundle.vae_scale_factor:
        problem = (
            f"it shrinks the control image {downscale} times, the model's latents are "
            f"{bundle.vae_scale_factor} times smaller"
        )
    else:
        return
    raise InvalidRequestError(
        f"the ControlNet {name!r} is for another kind of model than {bundle.name!r} "
        f"({problem}); choose one made for this model's family"
    )


def controlnet_folder(context: RunContext) -> str:
    """Where ControlNets are installed: ``controlnet/`` in the engine's models folder."""
    models_dir = getattr(getattr(context.engine, "models", None), "models_dir", None)
    return str(Path(models_dir or "models") / "controlnet")
