"""The controls every generation tab shares, and the wiring from a tab to the engine.

A tab module builds its own controls, then calls :func:`generation_tab`, which adds the shared
ones (prompt, sampler, steps, CFG, seed, size, batches, model), the Generate / Interrupt / Skip
buttons, the progress line, the live preview and the gallery, and connects Generate to the engine.
Handlers receive their inputs as one dict (gradio's "inputs as a set") and look values up by the
request field name, so adding a control never shifts anybody's arguments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from webui.engine.stream import Progress
from webui.errors import LatentStudioError
from webui.limits import LIMIT_FLAGS, Limits
from webui.request import GenerationRequest
from webui.ui.service import Finished, StudioService

__all__ = ["GenerationTab", "UIContext", "generation_tab"]

log = logging.getLogger(__name__)

SIZE_LIMIT = 2048
AUTOMATIC_VAE = "Automatic"  # the model's own VAE
BUSY_CONCURRENCY_ID = "generate"  # every tab's Generate shares one slot: one generation at a time


@dataclass
class UIContext:
    """What a tab's ``build`` gets: the service, the sampler names, the model to start with, and
    the tabs built before it."""

    service: StudioService
    samplers: list[str]
    default_model: str | None
    tabs: dict[str, GenerationTab] = field(default_factory=dict)  # generation tabs built so far, by task
    labels: dict[str, str] = field(default_factory=dict)  # every tab's label, by id
    selector: Any = None  # the gr.Tabs holding the tabs (select one with gr.Tabs(selected=id))

    @property
    def limits(self) -> Limits:
        """The server's limits per request (the controls' ranges)."""
        return getattr(self.service.engine, "limits", None) or Limits()

    @property
    def default_size(self) -> int:
        return self.service.model_info(self.default_model).default_size


@dataclass
class GenerationTab:
    """A built generation tab: its controls by request field name (so PNG Info can fill them)."""

    task: str
    fields: dict[str, gr.components.Component]
    generate: gr.Button
    gallery: gr.Gallery
    infotext: gr.Textbox


RequestExtras = Callable[[dict[str, Any]], dict[str, Any]]


def shared_controls(ctx: UIContext, task: str) -> tuple[dict[str, gr.components.Component], gr.Button]:
    """Prompt, negative prompt, model, sampler, steps, CFG, size, batches and seed; and the
    "Last seed" button, which the caller connects to its own last-seed state."""
    info = ctx.service.model_info(ctx.default_model)
    examples = info.examples
    fields: dict[str, gr.components.Component] = {}
    with gr.Row():
        fields["model"] = gr.Dropdown(
            choices=ctx.service.model_names(), value=ctx.default_model, label="Model", scale=4,
            elem_id=f"{task}-model", allow_custom_value=True,  # refreshed lists differ per session
        )
        fields["vae"] = gr.Dropdown(choices=vae_choices(ctx.service), value=AUTOMATIC_VAE, label="VAE", scale=2,
                                    elem_id=f"{task}-vae", allow_custom_value=True)
        refresh = gr.Button("↻ Refresh", scale=1, min_width=80, elem_id=f"{task}-refresh")
    limits = ctx.limits
    max_chars = limits.max_prompt_chars or None  # the browser stops typing there
    fields["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder=examples[0] if examples else "",
                                  elem_id=f"{task}-prompt", max_length=max_chars)
    with gr.Row():  # A1111's extra networks: pick one to add its prompt syntax
        lora = gr.Dropdown(choices=ctx.service.names("lora"), value=None, label="Add a LoRA", scale=1,
                           elem_id=f"{task}-add-lora")
        embedding = gr.Dropdown(choices=ctx.service.names("embedding"), value=None, label="Add an embedding",
                                scale=1, elem_id=f"{task}-add-embedding")
    lora.input(lambda prompt, name: (add_to_prompt(prompt, f"<lora:{name}:1>" if name else ""), None),
               inputs=[fields["prompt"], lora], outputs=[fields["prompt"], lora], queue=False,
               api_visibility="private")
    embedding.input(lambda prompt, name: (add_to_prompt(prompt, name or ""), None),
                    inputs=[fields["prompt"], embedding], outputs=[fields["prompt"], embedding], queue=False,
                    api_visibility="private")
    refresh.click(
        lambda: (gr.update(choices=ctx.service.model_names()), gr.update(choices=vae_choices(ctx.service)),
                 gr.update(choices=ctx.service.names("lora")), gr.update(choices=ctx.service.names("embedding"))),
        outputs=[fields["model"], fields["vae"], lora, embedding], queue=False, api_visibility="private")
    fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{task}-negative",
                                           max_length=max_chars)
    if examples:
        gr.Examples(examples=[[text] for text in examples], inputs=[fields["prompt"]], label="Try a prompt")
    with gr.Row():
        fields["sampler"] = gr.Dropdown(choices=ctx.samplers, value="DPM++ 2M Karras", label="Sampler")
        fields["steps"] = limited_slider(1, limits.max_steps or 150, value=min(20, limits.max_steps or 20), step=1,
                                        label="Steps", elem_id=f"{task}-steps", flag=LIMIT_FLAGS["max_steps"])
        fields["cfg_scale"] = gr.Slider(1.0, 30.0, value=info.cfg_scale, step=0.5,
                                        label="CFG scale", elem_id=f"{task}-cfg-scale")
    with gr.Row():
        side = size_limit(limits)
        pixels, batch = LIMIT_FLAGS["max_pixels"], LIMIT_FLAGS["max_batch"]
        fields["width"] = limited_slider(64, side, value=min(info.default_size, side), step=8, label="Width",
                                        elem_id=f"{task}-width", flag=pixels)
        fields["height"] = limited_slider(64, side, value=min(info.default_size, side), step=8, label="Height",
                                         elem_id=f"{task}-height", flag=pixels)
        fields["batch_count"] = limited_slider(1, limits.max_batch or 100, value=1, step=1, label="Batch count",
                                              elem_id=f"{task}-batch-count", flag=batch)
        fields["batch_size"] = gr.Slider(1, min(8, limits.max_batch or 8), value=1, step=1, label="Batch size")
    with gr.Row():
        fields["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", scale=4,
                                   elem_id=f"{task}-seed")
        random_seed = gr.Button("Random", scale=0, min_width=70, elem_id=f"{task}-random-seed")
        reuse_seed = gr.Button("Last seed", scale=0, min_width=80, elem_id=f"{task}-reuse-seed")
    random_seed.click(lambda: -1, outputs=fields["seed"], queue=False, api_visibility="private")

    def follow_model(name: str | None) -> tuple[float, int, int]:
        picked = ctx.service.model_info(name)  # its recommended guidance and native size
        return picked.cfg_scale, picked.default_size, picked.default_size

    # only a pick by the user: PNG Info's "send to" sets the model and its own CFG and size
    fields["model"].input(follow_model, inputs=fields["model"],
                          outputs=[fields["cfg_scale"], fields["width"], fields["height"]], queue=False,
                          api_visibility="private")
    return fields, reuse_seed


def limited_slider(*args: Any, flag: str, **kwargs: Any) -> gr.Slider:
    """A slider whose upper end is a server limit raised by ``flag``: a value above it (from an API
    client; the browser cannot go there) is refused with a message naming the flag, as the engine's
    own check would. (An ordinary ``gr.Slider``, so browsers and API clients see nothing new.)"""
    slider = gr.Slider(*args, **kwargs)
    check = slider.preprocess

    def preprocess(payload: float) -> float:
        if isinstance(payload, (int, float)) and slider.maximum is not None and payload > slider.maximum:
            raise gr.Error(f"{slider.label} {payload:g} is over this server's limit of {slider.maximum:g} ({flag})",
                           print_exception=False)
        return check(payload)

    slider.preprocess = preprocess  # type: ignore[method-assign]
    return slider


def size_limit(limits: Limits) -> int:
    """The width/height sliders' upper end: the side of the largest square under ``--max-pixels``
    (a multiple of 8), or 2048 without a limit."""
    if not limits.max_pixels:
        return SIZE_LIMIT
    side = math.isqrt(limits.max_pixels)
    return max(64, side - side % 8)


def vae_choices(service: StudioService) -> list[str]:
    return [AUTOMATIC_VAE, *service.names("vae")]


def add_to_prompt(prompt: str | None, text: str) -> str:
    """``prompt`` with ``text`` appended (separated by a comma), as A1111's extra-network cards do."""
    prompt = (prompt or "").rstrip()
    if not text:
        return prompt
    return f"{prompt}, {text}" if prompt and not prompt.endswith(",") else f"{prompt} {text}".strip()


def generation_tab(ctx: UIContext, task: str, extras: RequestExtras,
                   build_controls: Callable[[], dict[str, gr.components.Component]] | None = None,
                   ) -> GenerationTab:
    """Lay out a generation tab and connect it to the engine.

    ``build_controls`` (called inside the left column, after the shared controls) creates the
    tab's own controls; ``extras(values)`` turns all values into the task's request fields
    (``init_image``, ``mask``...). Returns the built tab.
    """
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            fields, reuse_seed = shared_controls(ctx, task)
            if build_controls is not None:
                fields.update(build_controls())
        with gr.Column(scale=2):
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", scale=3, elem_id=f"{task}-generate")
                interrupt = gr.Button("Interrupt", scale=1, elem_id=f"{task}-interrupt")
                skip = gr.Button("Skip", scale=1, elem_id=f"{task}-skip")
            progress = gr.Markdown("", elem_id=f"{task}-progress")
            preview = gr.Image(label="Preview", interactive=False, height=160, visible=True, format="png",
                               elem_id=f"{task}-preview")
            gallery = gr.Gallery(label="Results", columns=2, height=360, format="png", elem_id=f"{task}-gallery")
            infotext = gr.Textbox(label="Parameters", lines=4, interactive=False, buttons=["copy"],
                                  elem_id=f"{task}-infotext")
    last_seed = gr.State(-1)
    outputs = [progress, preview, gallery, infotext, last_seed]

    def run(data: dict[Any, Any], request: gr.Request,
            bar: gr.Progress = gr.Progress()) -> Iterator[dict[Any, Any]]:  # noqa: B008 - gradio's idiom
        values = {name: data[component] for name, component in fields.items()}
        session = _session_of(request)
        try:
            generation = build_request(task, values, extras)
        except LatentStudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        try:
            for event in ctx.service.run(generation, session):
                if isinstance(event, Progress):
                    bar((event.done, event.overall), desc=event.describe(), unit="steps")
                    update: dict[Any, Any] = {progress: event.describe()}
                    if event.preview:
                        update[preview] = event.preview[0]
                    yield update
                elif isinstance(event, Finished):
                    yield _finished(event, progress, preview, gallery, infotext, last_seed)
        except LatentStudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:  # a bug or the device failing: say so, keep serving
            log.exception("generation failed")
            raise gr.Error(f"generation failed: {type(error).__name__}: {error}", print_exception=False) from None

    generate.click(run, inputs=set(fields.values()), outputs=outputs, api_name=task,
                   concurrency_id=BUSY_CONCURRENCY_ID, concurrency_limit=1)

    def stop(request: gr.Request) -> None:
        ctx.service.interrupt(_session_of(request))

    def skip_batch(request: gr.Request) -> None:
        ctx.service.skip(_session_of(request))

    interrupt.click(stop, inputs=None, outputs=None, queue=False, api_name=f"{task}_interrupt")
    skip.click(skip_batch, inputs=None, outputs=None, queue=False, api_name=f"{task}_skip")
    reuse_seed.click(lambda seed: seed, inputs=last_seed, outputs=fields["seed"], queue=False,
                     api_visibility="private")
    tab = GenerationTab(task=task, fields=fields, generate=generate, gallery=gallery, infotext=infotext)
    ctx.tabs[task] = tab
    return tab


def build_request(task: str, values: dict[str, Any], extras: RequestExtras) -> GenerationRequest:
    """The typed request for ``task`` from a tab's values (shared ones and the tab's own)."""
    seed = values.get("seed")
    request = GenerationRequest(
        task=task,  # type: ignore[arg-type]
        prompt=values.get("prompt") or "",
        negative_prompt=values.get("negative_prompt") or "",
        model=values.get("model") or None,
        sampler=values.get("sampler") or "DPM++ 2M Karras",
        steps=int(values.get("steps") or 20),
        cfg_scale=float(values["cfg_scale"]) if values.get("cfg_scale") is not None else None,
        seed=-1 if seed is None or seed == "" else int(seed),
        width=int(values["width"]) if values.get("width") else None,
        height=int(values["height"]) if values.get("height") else None,
        batch_size=int(values.get("batch_size") or 1),
        batch_count=int(values.get("batch_count") or 1),
        vae=None if values.get("vae") in (None, "", AUTOMATIC_VAE) else str(values["vae"]),
    )
    return request.replace(**extras(values))


def _finished(event: Finished, progress: Any, preview: Any, gallery: Any, infotext: Any,
              last_seed: Any) -> dict[Any, Any]:
    done = f"{len(event.files)} image(s) in {event.seconds:.1f}s"
    if event.interrupted:
        done += " (interrupted: finished images kept)"
    if event.warning:  # saving failed: the images are shown all the same, the reason in one line
        done += f" · {event.warning}"
        gr.Warning(event.warning)
    return {
        progress: done,
        preview: None,
        gallery: event.files,
        infotext: event.infotexts[0] if event.infotexts else "",
        last_seed: event.seeds[0] if event.seeds else -1,
    }


def _session_of(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"
