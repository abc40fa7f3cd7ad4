"""Generation tabs derived from the request fields, and the wiring from a tab to the engine.

Every control of a generation tab comes from a field's declaration (:class:`webui.fields.Field`):
its kind and widget pick the gradio component (:func:`make_control`), its range and the server's
limits the slider's ends, its choices (a list, or a source such as the installed VAEs) the
dropdown's, its label and help the text. :func:`generation_tab` lays a task's fields out by group
(model, prompt, sampling, size, seed, the task's own groups, then "More options"), adds Generate /
Interrupt / Skip, the progress line, the live preview and the gallery, and connects Generate to the
engine; :func:`build_request` turns the values back into a request through the same declarations.

A tab module builds only the widgets no field describes (the inpainting editor that yields the
image and its mask, the segmentation-map editor) and turns their values into request fields.
Handlers receive their inputs as one dict (gradio's "inputs as a set") and look values up by field
name, so adding a field never shifts anybody's arguments.

Each generation tab has an id (the one it was registered with): its element ids
(``f"{tab_id}-{field name with '-'}"``), its web API endpoints (``tab_id``, ``{tab_id}_interrupt``,
``{tab_id}_skip``) and PNG Info's "Send to" target are keyed by it, so two tabs of one task never
collide.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.stream import Progress
from webui.errors import InvalidRequestError, LatentStudioError
from webui.fields import MAX_TEXT, Field, FieldRegistry
from webui.limits import LIMIT_FLAGS, Limits
from webui.plot import TYPE_FIELDS, axis_choices
from webui.request import GenerationRequest
from webui.ui.security import guard_image_input, open_upload
from webui.ui.service import Finished, StudioService

__all__ = [
    "GenerationTab",
    "UIContext",
    "build_request",
    "choices_of",
    "control_id",
    "generation_tab",
    "make_control",
]

log = logging.getLogger(__name__)

SIZE_LIMIT = 2048
BUSY_CONCURRENCY_ID = "generate"  # every tab's Generate shares one slot: one generation at a time
TAB_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}\Z")  # element ids and endpoint names are made from it
CORE_GROUPS = ("model", "prompt", "sampling", "size", "seed")  # the rows every generation tab starts with
ADVANCED = "advanced"  # the closed "More options" accordion at the end
# values that follow the model picked (its recommended guidance, its native size)
MODEL_DEPENDENT = ("cfg_scale", "width", "height", "steps", "sampler")
_DEFAULT = object()
AXIS_TYPE_FIELDS = frozenset(TYPE_FIELDS.values())  # the X/Y/Z plot's axis type dropdowns

RequestExtras = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class UIContext:
    """What a tab's ``build`` gets: the service, the sampler names, the model to start with, the
    generation tabs built before it, and the id of the tab being built."""

    service: StudioService
    samplers: list[str]
    default_model: str | None
    tabs: dict[str, GenerationTab] = field(default_factory=dict)  # generation tabs built so far, by tab id
    labels: dict[str, str] = field(default_factory=dict)  # every tab's label, by id
    selector: Any = None  # the gr.Tabs holding the tabs (select one with gr.Tabs(selected=id))
    current_tab: str | None = None  # the id of the tab being built (set by build_app)
    deferred: list[Callable[[], None]] = field(default_factory=list)

    @property
    def limits(self) -> Limits:
        """The server's limits per request (the controls' ranges)."""
        return getattr(self.service.engine, "limits", None) or Limits()

    @property
    def default_size(self) -> int:
        return self.service.model_info(self.default_model).default_size

    @property
    def fields(self) -> FieldRegistry:
        """The engine's field registry (every built-in and plugin field and task)."""
        registry = getattr(self.service.engine, "fields", None)
        return registry if isinstance(registry, FieldRegistry) else _builtin_fields()

    def when_built(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every tab is built (still inside the app, so it may add components
        to a layout block it re-enters, and connect to tabs registered after this one)."""
        self.deferred.append(callback)


@dataclass
class GenerationTab:
    """A built generation tab: its controls by field name (and its own widgets by their names)."""

    task: str
    fields: dict[str, gr.components.Component]
    generate: gr.Button
    gallery: gr.Gallery
    infotext: gr.Textbox
    id: str = ""  # the tab id: element ids, API endpoint, PNG Info's target

    def __post_init__(self) -> None:
        self.id = self.id or self.task


def is_titled(group: str) -> bool:
    """A group named like a title (``"Hires fix"``, not ``"sampling"``) is shown as a closed
    accordion with that title; other groups are rows."""
    return group[:1].isupper()


def slug(text: str) -> str:
    """``"X/Y/Z plot"`` -> ``"x-y-z-plot"`` (for element ids)."""
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def control_id(tab_id: str, name: str) -> str:
    """The element id of a field's control in a tab: ``txt2img-cfg-scale``."""
    return f"{tab_id}-{name.replace('_', '-')}"


# -- one control per field ------------------------------------------------------------------------


def choices_of(ctx: UIContext, declared: Field) -> list[str]:
    """What a choice field offers now: its fixed choices, or its source's names (samplers, installed
    checkpoints, VAEs, ControlNets...) rescanned, with the ``none_label`` first."""
    if declared.fixed_choices is not None:
        names = list(declared.fixed_choices)
    elif declared.source == "samplers":
        names = list(ctx.samplers)
    elif declared.source == "models:checkpoint":
        names = ctx.service.model_names()
    elif declared.source == "styles":  # styles.csv, read again when it changed
        from webui.styles import load_styles

        names = list(load_styles(ctx.service.engine))
    elif declared.source in ("upscalers", "upscalers:hires"):
        names = ctx.service.upscaler_names(latent=declared.source == "upscalers:hires")
    elif declared.source is not None:
        names = ctx.service.names(declared.source.split(":", 1)[1])
    else:
        names = []
    return [declared.none_label, *names] if declared.none_label is not None else names


def make_control(
    ctx: UIContext,
    declared: Field,
    tab_id: str,
    *,
    task: str | None = None,
    value: Any = _DEFAULT,
    **props: Any,
) -> gr.components.Component:
    """The gradio control of ``declared`` in tab ``tab_id`` (element id :func:`control_id`).

    Numbers: a slider from ``ui_minimum``/``ui_maximum`` (else the valid range), its top lowered to
    the server's limit when ``limit`` names one; a number box for ``widget="number"`` or an open
    range. Text: a text box (``lines``; at most the limit's or ``max_chars`` characters). Bool: a
    checkbox. Choice: a dropdown (``widget="radio"``: radio buttons) of :func:`choices_of`, which
    accepts names outside the list when they come from a source (the list is refreshed). Image: an
    upload (``widget="upload"``, refused with one line when it is not a sound image) or, for
    ``widget="sketch"``, a drawing canvas (white, of the model's size, black brush, uploads
    allowed) whose composite is the value. ``value`` overrides the field's default for ``task``;
    ``props`` go to the component (``scale``, ``placeholder``...).
    """
    if value is _DEFAULT:
        value = declared.default_for(task)
    offered = props.pop("choices", None)  # a text dropdown's list, when not its fixed choices
    info = props.pop("info", declared.help or None)
    if info and declared.kind != "image":
        props.setdefault("min_width", 200)  # a row of controls with help text wraps rather than squeezes
    common: dict[str, Any] = {"label": declared.label, "elem_id": control_id(tab_id, declared.name), **props}
    widget = widget_of(declared)
    if declared.kind in ("int", "float"):
        return _number_control(ctx, declared, widget, value, info, common)
    if declared.kind == "bool":
        return gr.Checkbox(value=bool(value), info=info, **common)
    if declared.kind == "text" and widget == "dropdown":  # free text with a list to pick from
        choices = list(offered if offered is not None else declared.fixed_choices or ())
        return gr.Dropdown(choices=choices, value=value, info=info, allow_custom_value=True, **common)
    if declared.kind == "text":
        return gr.Textbox(
            value=value or "",
            lines=declared.lines,
            max_length=_max_chars(ctx.limits, declared),
            info=info,
            **common,
        )
    if declared.kind == "choice":
        choices = choices_of(ctx, declared)
        if value is None:
            value = (
                declared.none_label if declared.none_label is not None else (choices[0] if choices else None)
            )
        if declared.multiple:
            return gr.Dropdown(
                choices=choices, value=list(value or ()), multiselect=True, info=info, **common
            )
        if widget == "radio":
            return gr.Radio(choices, value=value, info=info, **common)
        return gr.Dropdown(
            choices=choices, value=value, info=info, allow_custom_value=declared.source is not None, **common
        )
    if declared.kind == "image":
        subject = declared.label.lower()
        if widget == "sketch":
            size = ctx.default_size
            return guard_image_input(
                gr.ImageEditor(
                    **{
                        "value": {
                            "background": Image.new("RGB", (size, size), "white"),
                            "layers": [],
                            "composite": None,
                        },
                        "type": "pil",
                        "image_mode": "RGB",
                        "sources": ["upload", "clipboard"],
                        "brush": gr.Brush(
                            colors=["#000000"], color_mode="fixed", default_size=max(2, size // 64)
                        ),
                        "eraser": gr.Eraser(),
                        "transforms": (),
                        "layers": False,
                        "height": 360,
                        **common,
                    }
                ),
                subject,
            )
        return guard_image_input(
            gr.Image(
                **{
                    "type": "filepath",
                    "image_mode": None,
                    "sources": ["upload", "clipboard"],
                    "height": 300,
                    **common,
                }
            ),
            subject,
        )
    raise ValueError(f"field {declared.name!r}: no control for kind {declared.kind!r}")  # pragma: no cover


def widget_of(declared: Field) -> str:
    """The widget a field shows as: its own choice, else its kind's usual one."""
    if declared.widget:
        return declared.widget
    return {
        "int": "slider",
        "float": "slider",
        "bool": "checkbox",
        "text": "textbox",
        "choice": "dropdown",
        "image": "upload",
    }[declared.kind]


def _number_control(
    ctx: UIContext, declared: Field, widget: str, value: Any, info: str | None, common: dict[str, Any]
) -> gr.components.Component:
    low = declared.ui_minimum if declared.ui_minimum is not None else declared.minimum
    high = declared.ui_maximum if declared.ui_maximum is not None else declared.maximum
    limit = limit_of(ctx.limits, declared.limit)
    whole = declared.kind == "int"
    if widget == "number" or low is None or high is None:
        control = gr.Number(
            value=value,
            precision=0 if whole else None,
            minimum=declared.minimum,
            maximum=declared.maximum,
            step=declared.step or 1,
            info=info,
            **common,
        )
    else:
        top = min(high, limit) if limit is not None else high
        step = declared.step or (1 if whole else (top - low) / 100)
        if value is None:
            value = low
        control = gr.Slider(low, top, value=min(max(value, low), top), step=step, info=info, **common)
    return _checked(control, declared, limit)


def _checked(control: Any, declared: Field, limit: float | None) -> Any:
    """``control`` refusing, with one line naming it, a number over the server's limit (and the flag
    that raises it) or outside the field's valid range. Between the slider's top and the limit a
    value from an API client is let through (the slider's top is for the browser's comfort); the
    engine checks everything again."""
    if "preprocess" in vars(control) and getattr(control, "_field_check", None) is not None:
        return control  # already checked
    label = str(declared.label).split(" (")[0]  # "Seed (-1 = random)" -> "Seed"
    flag = LIMIT_FLAGS.get(declared.limit or "", "")
    original = control.preprocess

    def preprocess(payload: Any) -> Any:
        if not isinstance(payload, (int, float)) or isinstance(payload, bool):
            return original(payload)
        if limit is not None and payload > limit:
            raise gr.Error(
                f"{label} {payload:g} is over this server's limit of {limit:g} ({flag})",
                print_exception=False,
            )
        low, high = declared.minimum, declared.maximum
        if (low is not None and payload < low) or (high is not None and payload > high):
            raise gr.Error(
                f"{label} must be between {_shown(low)} and {_shown(high)}, got {_shown(payload)}",
                print_exception=False,
            )
        return gr.Number.round_to_precision(payload, getattr(control, "precision", None))

    control.preprocess = preprocess
    control._field_check = (declared, limit)
    return control


def keep_checks(demo: Any) -> None:
    """Keep the checks of :func:`make_control`'s number controls on the per-session copies gradio
    makes of a component when an event updates its properties (PNG Info leaving a control as it
    is does): the copy is built from the constructor's arguments and would check with gradio's
    own words, not ours."""
    original = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            for block in getattr(block_fn, "inputs", ()):
                check = getattr(block, "_field_check", None)
                if check is not None and state is not None and block._id in state:
                    copy = state[block._id]
                    if copy is not block:
                        _checked(copy, *check)
        except (
            Exception
        ):  # pragma: no cover - gradio's session state changed shape: the originals still check
            log.debug("cannot keep the checks on the session copies of controls", exc_info=True)
        return await original(block_fn, inputs, state, *args, **kwargs)

    demo.preprocess_data = preprocess_data


def limit_of(limits: Limits, name: str | None) -> int | None:
    """The upper end a :class:`Limits` attribute sets for one control (``max_pixels``: the side of
    the largest square under it), or None when there is no such limit."""
    if not name or not getattr(limits, name, 0):
        return None
    if name == "max_pixels":
        return size_limit(limits)
    return int(getattr(limits, name))


def size_limit(limits: Limits) -> int:
    """The width/height sliders' upper end: the side of the largest square under ``--max-pixels``
    (a multiple of 8), or 2048 without a limit."""
    if not limits.max_pixels:
        return SIZE_LIMIT
    side = math.isqrt(limits.max_pixels)
    return max(64, side - side % 8)


def _max_chars(limits: Limits, declared: Field) -> int | None:
    if declared.limit:
        return limit_of(limits, declared.limit)
    if declared.max_chars is None:
        return MAX_TEXT
    return declared.max_chars or None


def add_to_prompt(prompt: str | None, text: str) -> str:
    """``prompt`` with ``text`` appended (separated by a comma), as A1111's extra-network cards do."""
    prompt = (prompt or "").rstrip()
    if not text:
        return prompt
    return f"{prompt}, {text}" if prompt and not prompt.endswith(",") else f"{prompt} {text}".strip()


# -- a generation tab -------------------------------------------------------------------------------


def generation_tab(
    ctx: UIContext,
    task: str,
    extras: RequestExtras | None = None,
    build_controls: Callable[[], dict[str, gr.components.Component]] | None = None,
    *,
    tab_id: str | None = None,
    own: Sequence[str] = (),
) -> GenerationTab:
    """Lay out a generation tab for ``task`` and connect it to the engine.

    Every field of the task with ``ui=True`` gets its derived control (:func:`make_control`), laid
    out by group: the model row (with ↻ Refresh), the prompt (with the LoRA/embedding pickers and
    the model's example prompts), sampling, size, the seed (with Random and Last seed), the tab's
    own controls, the task's other groups in registration order, and "More options" (group
    ``"advanced"``: clip skip, eta, plugin fields), closed.

    ``tab_id`` (default: the tab being built, else ``task``) keys the element ids, the API endpoints
    and PNG Info's target. ``build_controls`` (called after the seed row) creates the tab's own
    widgets and returns them by name; those named after a field replace its derived control.
    ``own`` names fields the tab provides itself (no derived control): ``extras(values)`` turns the
    values of every control into those fields (``init_image``, ``mask``...). Returns the built tab.
    """
    tab_id = tab_id or ctx.current_tab or task
    if not TAB_ID.match(tab_id):
        raise ValueError(
            f"tab id {tab_id!r}: use lowercase letters, digits, '-' and '_', starting with a letter"
        )
    if tab_id in ctx.tabs:
        raise ValueError(f"tab id {tab_id!r} already has a generation tab")
    registry = ctx.fields
    registry.task(task)  # an unknown task: the tab shows why
    info = ctx.service.model_info(ctx.default_model)
    skipped = set(own)
    derived = [
        declared for declared in registry.for_task(task) if declared.ui and declared.name not in skipped
    ]
    groups: dict[str, list[Field]] = {}
    for declared in derived:
        groups.setdefault(declared.group, []).append(declared)

    def control(declared: Field, **props: Any) -> gr.components.Component:
        if declared.name in MODEL_DEPENDENT:
            props.setdefault("value", model_value(ctx, info, declared))
        elif declared.name == "model":
            props.setdefault("value", ctx.default_model)
        elif declared.name in AXIS_TYPE_FIELDS:  # the X/Y/Z plot's axes: every sweepable field too
            props.setdefault("choices", axis_choices(registry, task))
        return make_control(ctx, declared, tab_id, task=task, **props)

    controls: dict[str, gr.components.Component] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            wiring = _core_rows(ctx, tab_id, groups, control, controls, info.examples)
            if build_controls is not None:
                controls.update(build_controls())
            for group, members in groups.items():
                if group in CORE_GROUPS or group == ADVANCED:
                    continue
                members = [m for m in members if m.name not in controls]
                if is_titled(group):  # "Hires fix": a closed accordion with that title
                    with gr.Accordion(group, open=False, elem_id=f"{tab_id}-{slug(group)}"):
                        _titled_rows(members, control, controls)
                else:
                    _group_row(members, control, controls)
            advanced = [m for m in groups.get(ADVANCED, []) if m.name not in controls]
            if advanced:
                with gr.Accordion("More options", open=False, elem_id=f"{tab_id}-more"):
                    _group_row(advanced, control, controls)
        with gr.Column(scale=2):
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", scale=3, elem_id=f"{tab_id}-generate")
                interrupt = gr.Button("Interrupt", scale=1, elem_id=f"{tab_id}-interrupt")
                skip = gr.Button("Skip", scale=1, elem_id=f"{tab_id}-skip")
            progress = gr.Markdown("", elem_id=f"{tab_id}-progress")
            preview = gr.Image(
                label="Preview",
                interactive=False,
                height=160,
                visible=True,
                format="png",
                elem_id=f"{tab_id}-preview",
            )
            gallery = gr.Gallery(
                label="Results", columns=2, height=360, format="png", elem_id=f"{tab_id}-gallery"
            )
            infotext = gr.Textbox(
                label="Parameters", lines=4, interactive=False, buttons=["copy"], elem_id=f"{tab_id}-infotext"
            )
    last_seed = gr.State(-1)
    outputs = [progress, preview, gallery, infotext, last_seed]
    _wire_core(ctx, registry, controls, wiring, last_seed)

    def run(
        data: dict[Any, Any],
        request: gr.Request,
        bar: gr.Progress = gr.Progress(),  # noqa: B008 - gradio's idiom
    ) -> Iterator[dict[Any, Any]]:
        values = {name: data[component] for name, component in controls.items()}
        session = _session_of(request)
        try:
            generation = build_request(task, values, extras, fields=registry)
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
            raise gr.Error(
                f"generation failed: {type(error).__name__}: {error}", print_exception=False
            ) from None

    generate.click(
        run,
        inputs=set(controls.values()),
        outputs=outputs,
        api_name=tab_id,
        concurrency_id=BUSY_CONCURRENCY_ID,
        concurrency_limit=ctx.service.concurrency,
    )

    def stop(request: gr.Request) -> None:
        ctx.service.interrupt(_session_of(request))

    def skip_batch(request: gr.Request) -> None:
        ctx.service.skip(_session_of(request))

    interrupt.click(stop, inputs=None, outputs=None, queue=False, api_name=f"{tab_id}_interrupt")
    skip.click(skip_batch, inputs=None, outputs=None, queue=False, api_name=f"{tab_id}_skip")
    tab = GenerationTab(
        task=task, fields=controls, generate=generate, gallery=gallery, infotext=infotext, id=tab_id
    )
    ctx.tabs[tab_id] = tab
    return tab


@dataclass
class _Wiring:
    """The core rows' buttons and pickers, connected once every control exists."""

    refresh: gr.Button | None = None
    pickers: dict[str, gr.Dropdown] = field(default_factory=dict)  # add-a-LoRA / add-an-embedding
    random_seed: gr.Button | None = None
    reuse_seed: gr.Button | None = None
    style_name: gr.Textbox | None = None  # "Save style": the name, and the button
    save_style: gr.Button | None = None


def _core_rows(
    ctx: UIContext,
    tab_id: str,
    groups: dict[str, list[Field]],
    control: Callable[..., gr.components.Component],
    controls: dict[str, gr.components.Component],
    examples: list[str],
) -> _Wiring:
    wiring = _Wiring()
    with gr.Row():
        for declared in groups.get("model", []):
            controls[declared.name] = control(declared, scale=4 if declared.name == "model" else 2)
        wiring.refresh = gr.Button("↻ Refresh", scale=1, min_width=80, elem_id=f"{tab_id}-refresh")
    for declared in groups.get("prompt", []):
        props: dict[str, Any] = {}
        if declared.name == "prompt":
            props["placeholder"] = examples[0] if examples else ""
        if declared.name == "styles":  # the styles, and saving the prompts as one (A1111's style row)
            with gr.Row():
                controls[declared.name] = control(declared, scale=4)
                wiring.style_name = gr.Textbox(
                    label="Style name", scale=2, max_length=200, elem_id=f"{tab_id}-style-name"
                )
                wiring.save_style = gr.Button(
                    "Save style", scale=1, min_width=80, elem_id=f"{tab_id}-save-style"
                )
            continue
        controls[declared.name] = control(declared, **props)
        if declared.name == "prompt":
            with gr.Row():  # A1111's extra networks: pick one to add its prompt syntax
                for kind, label in (("lora", "Add a LoRA"), ("embedding", "Add an embedding")):
                    wiring.pickers[kind] = gr.Dropdown(
                        choices=ctx.service.names(kind),
                        value=None,
                        label=label,
                        scale=1,
                        elem_id=f"{tab_id}-add-{kind}",
                    )
    if examples and "prompt" in controls:
        gr.Examples(examples=[[text] for text in examples], inputs=[controls["prompt"]], label="Try a prompt")
    for group in ("sampling", "size"):
        _group_row(groups.get(group, []), control, controls)
    seed_group = groups.get("seed", [])
    if seed_group:
        with gr.Row():
            for declared in seed_group:
                controls[declared.name] = control(declared, scale=4)
            if "seed" in controls:
                wiring.random_seed = gr.Button(
                    "Random", scale=0, min_width=70, elem_id=f"{tab_id}-random-seed"
                )
                wiring.reuse_seed = gr.Button(
                    "Last seed", scale=0, min_width=80, elem_id=f"{tab_id}-reuse-seed"
                )
    return wiring


def _titled_rows(
    members: list[Field],
    control: Callable[..., gr.components.Component],
    controls: dict[str, gr.components.Component],
) -> None:
    """A titled group's controls: its switches on one row, then rows that each start at a dropdown
    (a type and its values side by side: "X type", "X values")."""
    switches = [m for m in members if m.kind == "bool"]
    if switches:
        with gr.Row():
            for declared in switches:
                controls[declared.name] = control(declared)
    rows: list[list[Field]] = []
    for declared in members:
        if declared.kind == "bool":
            continue
        if not rows or widget_of(declared) == "dropdown":
            rows.append([])
        rows[-1].append(declared)
    for row in rows:
        _group_row(row, control, controls)


def _group_row(
    members: list[Field],
    control: Callable[..., gr.components.Component],
    controls: dict[str, gr.components.Component],
) -> None:
    """One group: images and multi-line text one under the other, then the rest side by side."""
    tall = [m for m in members if m.kind == "image" or (m.kind == "text" and m.lines > 1)]
    for declared in tall:
        controls[declared.name] = control(declared)
    rest = [m for m in members if m not in tall]
    if rest:
        with gr.Row():
            for declared in rest:
                controls[declared.name] = control(declared)


def _wire_core(
    ctx: UIContext,
    registry: FieldRegistry,
    controls: dict[str, gr.components.Component],
    wiring: _Wiring,
    last_seed: gr.State,
) -> None:
    prompt = controls.get("prompt")
    for kind, picker in wiring.pickers.items():
        if prompt is None:
            continue
        syntax = (
            (lambda name: f"<lora:{name}:1>" if name else "") if kind == "lora" else (lambda name: name or "")
        )
        picker.input(
            lambda text, name, syntax=syntax: (add_to_prompt(text, syntax(name)), None),
            inputs=[prompt, picker],
            outputs=[prompt, picker],
            queue=False,
            api_visibility="private",
        )
    # ↻ Refresh: every list of installed models in the tab, rescanned
    listed = [
        (registry[name], component)
        for name, component in controls.items()
        if name in registry
        and ((registry[name].source or "").startswith("models:") or registry[name].source == "styles")
    ]
    if wiring.refresh is not None and (listed or wiring.pickers):

        def refresh() -> list[Any]:
            updates = [gr.update(choices=choices_of(ctx, declared)) for declared, _ in listed]
            return updates + [gr.update(choices=ctx.service.names(kind)) for kind in wiring.pickers]

        wiring.refresh.click(
            refresh,
            outputs=[c for _, c in listed] + list(wiring.pickers.values()),
            queue=False,
            api_visibility="private",
        )
    if wiring.save_style is not None and wiring.style_name is not None:
        _wire_save_style(ctx, registry, controls, wiring.style_name, wiring.save_style)
    if wiring.random_seed is not None:
        wiring.random_seed.click(lambda: -1, outputs=controls["seed"], queue=False, api_visibility="private")
    if wiring.reuse_seed is not None:
        wiring.reuse_seed.click(
            lambda seed: seed,
            inputs=last_seed,
            outputs=controls["seed"],
            queue=False,
            api_visibility="private",
        )
    followers = [name for name in MODEL_DEPENDENT if name in controls]
    if "model" in controls and followers:

        def follow_model(name: str | None) -> list[Any]:
            picked = ctx.service.model_info(name)  # its recommended guidance, steps, sampler, size
            return [model_value(ctx, picked, registry.field(follower)) for follower in followers]

        # only a pick by the user: PNG Info's "send to" sets the model and its own CFG and size
        controls["model"].input(
            follow_model,
            inputs=controls["model"],
            outputs=[controls[n] for n in followers],
            queue=False,
            api_visibility="private",
        )


def model_value(ctx: UIContext, info: Any, declared: Field) -> Any:
    """What a model-dependent control shows for a model: its recommended guidance, steps and
    sampler (``model_index.json``'s ``defaults``), its native size; a field's own default where the
    model recommends nothing (or a sampler this server does not have)."""
    if declared.name == "cfg_scale":
        return info.cfg_scale
    if declared.name in ("width", "height"):
        return info.default_size
    if declared.name == "steps" and info.steps is not None:
        return info.steps
    if declared.name == "sampler" and info.sampler in ctx.samplers:
        return info.sampler
    return declared.default


def style_saving_problem(service: Any, username: str | None) -> str | None:
    """Why "Save style" must not write the styles file for this user, or None when it may: on a
    server on 127.0.0.1 (where the Plugins tab may change things), for a logged-in user, or without
    a server (``service.plugin_control`` unset: tests, a program embedding the app)."""
    control = getattr(service, "plugin_control", None)
    if control is None or getattr(control, "problem", None) is None or username:
        return None
    return "Saving styles is off on a server others can reach without a login."


def _wire_save_style(
    ctx: UIContext,
    registry: FieldRegistry,
    controls: dict[str, gr.components.Component],
    name_box: gr.Textbox,
    button: gr.Button,
) -> None:
    """ "Save style": the prompt and negative prompt saved under the name given in the data folder's
    styles.csv (a style of that name is replaced, as in A1111), then the list of styles refreshed.
    Allowed where the Plugins tab may change things (a server on 127.0.0.1), for a logged-in user,
    or without a server (tests, an embedding program); refused with one line elsewhere."""
    from webui.styles import save_style

    picker = controls["styles"]
    if "prompt" not in controls or "negative_prompt" not in controls:
        return

    def save(name: str, prompt: str, negative: str, request: gr.Request) -> Any:
        refused = style_saving_problem(ctx.service, getattr(request, "username", None))
        if refused:
            raise gr.Error(refused, print_exception=False)
        try:
            path = save_style(name or "", prompt or "", negative or "")
        except LatentStudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except OSError as error:
            raise gr.Error(
                f"cannot save the style: {error.strerror or error}", print_exception=False
            ) from None
        gr.Info(f"Saved style {name.strip()!r} in {path}")
        return gr.update(choices=choices_of(ctx, registry["styles"]))

    button.click(
        save,
        inputs=[name_box, controls["prompt"], controls["negative_prompt"]],
        outputs=picker,
        queue=False,
        api_visibility="private",
    )


# -- from values to a request --------------------------------------------------------------------


def build_request(
    task: str,
    values: Mapping[str, Any],
    extras: RequestExtras | None = None,
    *,
    fields: FieldRegistry | None = None,
) -> GenerationRequest:
    """The typed request for ``task`` from a tab's values by name.

    Each value of a field's control is checked against its declaration (:func:`ui_value`); built-in
    fields become the request's attributes and the rest ``request.extra`` entries. ``extras(values)``
    adds the fields a tab makes from its own widgets. Raises :class:`InvalidRequestError` with one
    line for a bad value or a missing required image ("upload an init image first").
    """
    registry = fields if fields is not None else _builtin_fields()
    spec = registry.task(task)
    found: dict[str, Any] = {}
    for name, value in values.items():
        declared = registry.get(name)
        if declared is not None and declared.applies_to(task):
            found[name] = ui_value(declared, value, task)
    if extras is not None:
        found.update(extras(dict(values)))
    for name in spec.requires:
        declared = registry.get(name)
        if found.get(name) is None and name in values and declared is not None and declared.kind == "image":
            raise InvalidRequestError(
                f"{'draw or upload' if widget_of(declared) == 'sketch' else 'upload'} "
                f"{_with_article(declared.label.lower())} first"
            )
    own, extra = registry.split(found)
    return GenerationRequest(task=task, **own, extra=extra)


def ui_value(declared: Field, value: Any, task: str) -> Any:
    """A control's value as the request field ``declared`` takes it.

    An emptied control means the field's default; the ``none_label`` means None; a whole float of
    an int field becomes an int; an uploaded image is opened (and refused with one line when it is
    not a sound image), a drawing canvas gives its composite. The request checks its own text and
    images itself (its messages, a mask's alpha channel), so built-in text and images pass as they are;
    everything else goes through :meth:`Field.check`.
    """
    builtin = _is_attribute(declared.name)
    if declared.kind == "image":
        if isinstance(value, dict):  # a drawing canvas
            value = value.get("composite") or value.get("background")
        if value is None or value == "":
            return None
        if isinstance(value, str):
            value = open_upload(value, declared.label.lower())
        return value if builtin else declared.check(value)
    if value is None or (value == "" and declared.kind != "text"):
        value = declared.default_for(task)
        if value is None:
            return None
    if builtin and declared.kind == "text":
        return str(value)
    return declared.check(value)


def _is_attribute(name: str) -> bool:
    from webui.request import request_attributes

    return name in request_attributes()


def _with_article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _shown(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


_BUILTIN: FieldRegistry | None = None


def _builtin_fields() -> FieldRegistry:
    """The built-in fields alone, for a service whose engine has no registry (test doubles)."""
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = FieldRegistry.builtin()
    return _BUILTIN


def _finished(
    event: Finished, progress: Any, preview: Any, gallery: Any, infotext: Any, last_seed: Any
) -> dict[Any, Any]:
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
