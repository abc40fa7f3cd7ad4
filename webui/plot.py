"""The X/Y/Z plot: sweep up to three parameters and draw the images as a labelled grid.

A plot is a base request with up to three axes. Each axis has a type and a values text:

* the built-in types ``Seed``, ``Steps``, ``CFG Scale``, ``Sampler``, ``Checkpoint``, ``VAE``,
  ``Denoising strength`` (tasks with an init image) and ``Prompt S/R`` (the first value is searched
  for in the prompt and the negative prompt, each value replaces it);
* every other registered field (built-in or a plugin's: ``Eta``, ``Clip skip``, ``CFG rescale``...)
  by its label or its name, so a plugin's field is swept with no code of its own.

Values are a comma-separated list (quote a value holding a comma: ``"a, b",c``). Numbers also take
A1111's ranges: ``1-5`` (every whole number), ``1-10 (+2)`` (a step), ``0.5-1.5 [3]`` (a count, evenly
spread). A choice takes names from its list (samplers, installed checkpoints and VAEs, a field's
choices), matched without regard to case. The number of values is known before any is made, and
the whole plot (cells x images per cell) is checked against the server's ``max_plot_images``
limit before anything runs; a bad value gives one line naming the axis and the value.

:func:`make_plan` reads a request's plot settings (the fields :data:`PLOT_FIELDS`, declared by the
built-in plugin ``webui.builtin.xyz_plot``) into a :class:`Plan`: the axes and one request per
cell. :func:`execute` runs the cells one after the other through ``engine.generate`` (following
interrupt and skip), saves each image with its own infotext as a normal generation does, and draws
one grid per Z value (:func:`draw_grid`); a cell that did not run stays blank.

No torch here: the web UI and the HTTP API plan and draw with this module; the engine runs the cells.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from webui.engine.control import GenerationControl
from webui.engine.stream import Progress, stream
from webui.errors import InvalidRequestError
from webui.fields import Field, FieldRegistry
from webui.limits import Limits, check_total
from webui.metadata import format_infotext
from webui.request import GenerationRequest

__all__ = [
    "AXES",
    "ENABLED",
    "GROUP",
    "PLOT_FIELDS",
    "Axis",
    "AxisType",
    "CellProgress",
    "GridImage",
    "Plan",
    "PlotResult",
    "axis_choices",
    "axis_types",
    "draw_grid",
    "enabled",
    "execute",
    "find_axis",
    "grid_folder",
    "grids_of",
    "make_plan",
    "parse_values",
    "plot_values",
    "source_names",
]

# the request fields of a plot (request.extra), declared by webui.builtin.xyz_plot
ENABLED = "xyz_enabled"
LEGEND = "xyz_draw_legend"
KEEP_SEEDS = "xyz_keep_seeds"
AXES = ("x", "y", "z")
TYPE_FIELDS = {axis: f"xyz_{axis}_type" for axis in AXES}
VALUE_FIELDS = {axis: f"xyz_{axis}_values" for axis in AXES}
PLOT_FIELDS = frozenset({ENABLED, LEGEND, KEEP_SEEDS, *TYPE_FIELDS.values(), *VALUE_FIELDS.values()})
GROUP = "X/Y/Z plot"

NOTHING = "Nothing"
PROMPT_SR = "Prompt S/R"
MAX_VALUES_CHARS = 10_000  # characters of one axis's values text
HARD_CAP = 10_000  # values on one axis when the server sets no plot limit
MAX_LABEL_CHARS = 200  # characters of one label drawn on a grid
SEED_RANGE = 2**32 - 1 - 10_000  # as the engine draws a random seed (seed + k stays in range)
# fields no axis sweeps: the prompts (Prompt S/R does), the request's size in images, the plot's own
NOT_SWEPT = frozenset({"prompt", "negative_prompt", "batch_size", "batch_count", *PLOT_FIELDS})

_NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?\s*\Z")


@dataclass(frozen=True)
class AxisType:
    """What an axis sweeps: a request field (``field``), or nothing / the prompt's search and replace."""

    label: str
    field: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.field or self.label


BUILTIN_AXES: tuple[AxisType, ...] = (
    AxisType(NOTHING, None, ("none", "")),
    AxisType("Seed", "seed"),
    AxisType("Steps", "steps"),
    AxisType("CFG Scale", "cfg_scale", ("cfg",)),
    AxisType("Sampler", "sampler", ("sampler_name",)),
    AxisType("Checkpoint", "model", ("checkpoint name", "checkpoint", "model")),
    AxisType("VAE", "vae"),
    AxisType("Denoising strength", "strength", ("denoising", "denoising_strength")),
    AxisType(PROMPT_SR, None, ("prompt_sr", "prompt sr", "prompt s/r")),
)


def enabled(request: Any) -> bool:
    """Whether ``request`` asks for a plot (its ``xyz_enabled`` field is on)."""
    return bool(getattr(request, "extra", {}).get(ENABLED))


def axis_types(registry: FieldRegistry, task: str) -> list[AxisType]:
    """The axis types a plot of ``task`` offers: the built-in ones, then every other registered
    field of the task that an axis can sweep (numbers, choices, switches, text), by its label."""
    types: list[AxisType] = []
    for axis in BUILTIN_AXES:
        declared = registry.get(axis.field) if axis.field else None
        if axis.field is None or (declared is not None and declared.applies_to(task)):
            types.append(axis)
    taken = {axis.label.casefold() for axis in types}
    covered = {axis.field for axis in BUILTIN_AXES}
    for declared in registry:
        if declared.name in covered or declared.name in NOT_SWEPT or declared.kind == "image":
            continue
        if not declared.applies_to(task):
            continue
        label = declared.label.split(" (")[0].strip() or declared.name
        if label.casefold() in taken:
            label = f"{label} ({declared.name})"
        taken.add(label.casefold())
        types.append(AxisType(label, declared.name))
    return types


def axis_choices(registry: FieldRegistry, task: str) -> list[str]:
    """The labels of :func:`axis_types`, for the web UI's type dropdowns."""
    return [axis.label for axis in axis_types(registry, task)]


def find_axis(registry: FieldRegistry, task: str, name: Any, letter: str = "X") -> AxisType:
    """The axis type called ``name``: its label, a field's name or an alias, in any case."""
    wanted = " ".join(str(name if name is not None else "").split()).casefold()
    types = axis_types(registry, task)
    for axis in types:
        if wanted in (axis.label.casefold(), (axis.field or "").casefold(), *axis.aliases):
            return axis
    shown = str(name)[:60]
    raise InvalidRequestError(
        f"{letter} axis: unknown type {shown!r} for {task}; choose one of "
        + ", ".join(axis.label for axis in types)
    )


# -- values ------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """The comma-separated items of ``text`` (commas and new lines separate; quotes keep a comma),
    stripped, empty ones dropped."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [item.strip() for row in rows for item in row if item.strip()]


def parse_values(
    axis: AxisType,
    text: Any,
    declared: Field | None,
    *,
    letter: str = "X",
    bound: int = HARD_CAP,
    names: Callable[[str], Sequence[str] | None] | None = None,
) -> list[Any]:
    """The values an axis's ``text`` stands for, each checked against the field ``declared``.

    ``bound``: the most values the axis may have (known before a range is made). ``names(source)``
    lists a choice source's names (``"samplers"``, ``"models:checkpoint"``, ``"models:vae"``), or
    None when they cannot be listed (the engine checks them then). Raises
    :class:`InvalidRequestError` naming the axis and the value.
    """
    if axis.label == NOTHING:
        return [None]
    text = "" if text is None else str(text)
    where = f"{letter} axis ({axis.label})"
    if len(text) > MAX_VALUES_CHARS:
        raise InvalidRequestError(
            f"{where}: {len(text)} characters of values; the limit is {MAX_VALUES_CHARS}"
        )
    items = split_values(text)
    if not items:
        raise InvalidRequestError(f"{where}: no values; write them separated by commas")
    if axis.label == PROMPT_SR or declared is None:
        _check_count(where, len(items), bound)
        return items
    values: list[Any] = []
    for item in items:
        if declared.kind in ("int", "float"):
            expanded = _expand_range(where, item, declared.kind, bound - len(values))
            if expanded is not None:
                for value in expanded:
                    values.append(_checked(where, declared, value, item))
                continue
        if declared.kind == "choice":
            values.append(_choice(where, declared, item, names))
        else:
            try:
                values.append(declared.parse(item))
            except InvalidRequestError as error:
                raise InvalidRequestError(f"{where}: {_shown(item)} is not valid ({error})") from None
        _check_count(where, len(values), bound)
    return values


def _check_count(where: str, count: int, bound: int) -> None:
    if count > bound:
        raise InvalidRequestError(f"{where}: more than {bound} values; that is over the plot's limit")


def _checked(where: str, declared: Field, value: Any, item: str) -> Any:
    try:
        return declared.check(value)
    except InvalidRequestError as error:
        raise InvalidRequestError(f"{where}: {_shown(item)} gives {_shown(value)} ({error})") from None


def _expand_range(where: str, item: str, kind: str, room: int) -> list[int | float] | None:
    """The numbers a range item stands for (``1-5``, ``1-10 (+2)``, ``0.5-1.5 [3]``); None when the
    item is not a range. The count is worked out first: over ``room`` refuses before making any."""
    if "-" not in item[1:]:
        return None
    match = _RANGE.match(item)
    if match is None:
        return None
    start_text, end_text, step_text, count_text = match.groups()
    whole = kind == "int"

    def number(text: str) -> int | float:
        text = text.replace(" ", "")
        try:
            return int(text) if whole else float(text)
        except ValueError:
            raise InvalidRequestError(f"{where}: {_shown(item)} needs whole numbers") from None

    start, end = number(start_text), number(end_text)
    if count_text is not None:
        count = int(count_text) if len(count_text) < 10 else room + 1
        if count < 1:
            raise InvalidRequestError(f"{where}: {_shown(item)} asks for no values")
        if count > room:
            raise InvalidRequestError(
                f"{where}: {_shown(item)} makes {count_text} values, over the plot's limit"
            )
        if count == 1:
            return [start]
        spread = [start + (end - start) * k / (count - 1) for k in range(count)]
        return [int(value) for value in spread] if whole else [_tidy(value) for value in spread]
    step = number(step_text) if step_text is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise InvalidRequestError(f"{where}: the step of {_shown(item)} never reaches its end")
    span = (end - start) / step
    if not math.isfinite(span) or span + 1 > room:
        raise InvalidRequestError(f"{where}: {_shown(item)} makes too many values, over the plot's limit")
    count = int(math.floor(span + 1e-9)) + 1
    values = [start + k * step for k in range(count)]
    return values if whole else [_tidy(value) for value in values]


def _tidy(value: float) -> float:
    """``value`` without the float noise of adding steps (0.30000000000000004 -> 0.3)."""
    return round(value, 10) + 0.0


def _choice(
    where: str, declared: Field, item: str, names: Callable[[str], Sequence[str] | None] | None
) -> Any:
    if declared.none_label is not None and item.casefold() == declared.none_label.casefold():
        return declared.check(None)
    known = declared.fixed_choices
    if known is None and declared.source is not None and names is not None:
        listed = names(declared.source)
        known = tuple(listed) if listed else None
    if known is None:
        return declared.check(item)
    for name in known:
        if name.casefold() == item.casefold():
            return declared.check(name)
    offered = ", ".join(list(known)[:20]) + (", ..." if len(known) > 20 else "")
    raise InvalidRequestError(
        f"{where}: unknown {declared.label.lower()} {_shown(item)}; choose from {offered}"
    )


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its letter, type, values text as written, values and their grid labels."""

    letter: str
    type: AxisType
    text: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]

    @property
    def used(self) -> bool:
        return self.type.label != NOTHING

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Cell:
    """One image (or batch) of the plot: where it sits and the request that makes it."""

    index: int
    x: int
    y: int
    z: int
    request: GenerationRequest


@dataclass
class Plan:
    """A plot ready to run: the axes, one request per cell (Z slowest, then Y, then X), the legend."""

    base: GenerationRequest
    axes: tuple[Axis, Axis, Axis]
    cells: list[Cell]
    legend: bool = True

    @property
    def x(self) -> Axis:
        return self.axes[0]

    @property
    def y(self) -> Axis:
        return self.axes[1]

    @property
    def z(self) -> Axis:
        return self.axes[2]

    @property
    def images(self) -> int:
        """How many images the plot makes (cells x images per cell)."""
        return len(self.cells) * self.base.batch_size * self.base.batch_count

    def describe(self) -> dict[str, str]:
        """The infotext entries that say how the grid was made (A1111's ``X Type``, ``X Values``...)."""
        entries = {"Script": "X/Y/Z plot"}
        for axis in self.axes:
            if axis.used:
                entries[f"{axis.letter} Type"] = axis.type.label
                entries[f"{axis.letter} Values"] = axis.text
                if axis.type.field == "seed":
                    entries[f"Fixed {axis.letter} Values"] = ", ".join(str(value) for value in axis.values)
        return entries


def plot_values(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The plot's own settings in a request's ``extra`` (the :data:`PLOT_FIELDS`)."""
    return {name: extra[name] for name in PLOT_FIELDS if name in extra}


def source_names(engine: Any) -> Callable[[str], list[str] | None]:
    """``names(source)`` for :func:`make_plan` over an engine: its samplers, checkpoints and VAEs."""

    def names(source: str) -> list[str] | None:
        try:
            if source == "samplers":
                return list(engine.schedulers.names())
            if source.startswith("models:"):
                return [entry.name for entry in engine.models.list(source.split(":", 1)[1])]
        except Exception:  # no listing to check against: the engine checks the name when it runs
            return None
        return None

    return names


def make_plan(
    request: GenerationRequest,
    registry: FieldRegistry,
    *,
    limits: Limits | None = None,
    names: Callable[[str], Sequence[str] | None] | None = None,
    rng: random.Random | None = None,
) -> Plan:
    """The plot ``request`` asks for (its ``xyz_*`` fields), every cell's request made and checked.

    The base seed is fixed first (a random one when it is -1), so every cell starts from the same
    noise; so is a seed axis's -1, unless ``xyz_keep_seeds`` is on. Raises
    :class:`InvalidRequestError` (one line naming the axis and the value) or
    :class:`~webui.limits.LimitExceeded` (over ``max_plot_images``) before anything runs.
    """
    limits = limits or Limits()
    extra = request.extra
    task = request.task
    limit = limits.max_plot_images
    per_cell = max(1, int(request.batch_size)) * max(1, int(request.batch_count))
    bound = limit or HARD_CAP  # values on one axis; the whole plot is checked below
    keep_seeds = bool(extra.get(KEEP_SEEDS, False))
    rng = rng or random.Random()
    axes: list[Axis] = []
    for letter in AXES:
        kind = find_axis(registry, task, extra.get(TYPE_FIELDS[letter]) or NOTHING, letter.upper())
        text = str(extra.get(VALUE_FIELDS[letter]) or "")
        declared = registry.get(kind.field) if kind.field else None
        values = parse_values(kind, text, declared, letter=letter.upper(), bound=bound, names=names)
        if kind.field == "seed" and not keep_seeds:
            values = [rng.randrange(SEED_RANGE) if value == -1 else value for value in values]
        if kind.label == PROMPT_SR:
            _check_search(letter.upper(), request, values[0])
        labels = tuple(_label(kind, declared, value) for value in values)
        axes.append(Axis(letter.upper(), kind, text if kind.label != NOTHING else "", tuple(values), labels))
    x, y, z = axes
    cells_count = len(x) * len(y) * len(z)
    check_total(
        f"the plot makes {len(x)} x {len(y)} x {len(z)} cells of {per_cell} image(s) = "
        f"{cells_count * per_cell} images",
        cells_count * per_cell,
        limit,
        "max_plot_images",
    )
    base_extra = {name: value for name, value in extra.items() if name not in PLOT_FIELDS}
    base = request.replace(extra=base_extra)
    if base.seed == -1 and not keep_seeds:
        base = base.replace(seed=rng.randrange(SEED_RANGE))
    cells: list[Cell] = []
    for iz, zv in enumerate(z.values):
        for iy, yv in enumerate(y.values):
            for ix, xv in enumerate(x.values):
                cell = base
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    cell = _apply(cell, axis, value)
                _check_cell(cell, limits)
                cells.append(Cell(len(cells), ix, iy, iz, cell))
    return Plan(base=base, axes=(x, y, z), cells=cells, legend=bool(extra.get(LEGEND, True)))


def _apply(request: GenerationRequest, axis: Axis, value: Any) -> GenerationRequest:
    if not axis.used:
        return request
    if axis.type.label == PROMPT_SR:
        search = axis.values[0]
        return request.replace(
            prompt=request.prompt.replace(search, value),
            negative_prompt=request.negative_prompt.replace(search, value),
        )
    name = axis.type.field
    assert name is not None
    if hasattr(request, name) and name != "extra":
        return request.replace(**{name: value})
    return request.replace(extra={**request.extra, name: value})


def _check_search(letter: str, request: GenerationRequest, search: str) -> None:
    if search not in request.prompt and search not in request.negative_prompt:
        raise InvalidRequestError(
            f"{letter} axis (Prompt S/R): {_shown(search)} is in neither the prompt nor the negative prompt"
        )


def _check_cell(request: GenerationRequest, limits: Limits) -> None:
    limits.check_request(request)


def _label(kind: AxisType, declared: Field | None, value: Any) -> str:
    if kind.label == NOTHING:
        return ""
    if kind.label == PROMPT_SR:
        return _clip(str(value))
    if value is None and declared is not None and declared.none_label is not None:
        value = declared.none_label
    shown = _shown(value, quoted=False)
    if declared is not None and declared.kind == "choice":
        return _clip(shown)
    return _clip(f"{kind.label}: {shown}")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."


def _shown(value: Any, *, quoted: bool = True) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else repr(value)
    text = str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return repr(text) if quoted and isinstance(value, str) else text


# -- running -----------------------------------------------------------------------------------


@dataclass
class CellProgress(Progress):
    """A step of one cell: ``cell`` of ``cells`` (from 1), with ``done``/``overall`` over the plot."""

    cell: int = 1
    cells: int = 1

    def describe(self) -> str:
        return f"Cell {self.cell} of {self.cells} · {super().describe()}"


@dataclass
class GridImage:
    """One grid of a plot (one per Z value): the image, its ``parameters`` text, its file if saved."""

    image: Image.Image
    infotext: str
    z: int = 0
    path: Path | None = None
    error: str | None = None


@dataclass
class PlotResult:
    """A finished (or interrupted) plot: the grids, every cell's images in cell order, the time."""

    plan: Plan
    grids: list[GridImage]
    cells: list[list[Any]]  # OutputImage lists, one per cell (empty: the cell did not run)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def images(self) -> list[Any]:
        return [item for images in self.cells for item in images]


def execute(
    engine: Any,
    plan: Plan,
    *,
    control: GenerationControl | None = None,
    on_batch: Callable[[list[Any]], None] | None = None,
    grid_dir: str | Path | None = None,
    preview_every: int = 5,
) -> Iterator[CellProgress | PlotResult]:
    """Run ``plan``'s cells one by one (``engine.generate`` each, through
    :func:`~webui.engine.stream.stream`), yielding :class:`CellProgress` and then the
    :class:`PlotResult`.

    ``on_batch`` gets each finished batch's images as a normal generation's would (a
    :class:`~webui.output.BatchSaver` saves them with their infotexts). ``control.interrupt()`` stops
    the current cell and runs no more (what is done is kept, the grid still drawn);
    ``control.skip()`` drops the current cell and goes on. The grids are saved into ``grid_dir``
    (A1111's ``outputs/txt2img-grids``) when it is given. Errors of a cell are raised.
    """
    control = control or GenerationControl()
    started = time.perf_counter()
    planned = [max(1, cell.request.steps) * max(1, cell.request.batch_count) for cell in plan.cells]
    overall = sum(planned)
    results: list[list[Any]] = [[] for _ in plan.cells]
    finished_before = 0
    interrupted = False
    for number, cell in enumerate(plan.cells):
        if control.interrupted:
            interrupted = True
            break
        kept: list[Any] = []

        def keep(images: list[Any], kept: list[Any] = kept) -> None:
            kept.extend(images)
            if on_batch is not None:
                on_batch(images)

        for event in stream(
            engine, cell.request, control=control, preview_every=preview_every, on_batch=keep
        ):
            if isinstance(event, Progress):
                share = int(planned[number] * event.fraction)
                yield CellProgress(
                    event.step,
                    event.total,
                    event.batch,
                    event.batches,
                    min(overall, finished_before + share),
                    overall,
                    time.perf_counter() - started,
                    None,
                    event.preview,
                    cell=number + 1,
                    cells=len(plan.cells),
                )
            else:
                seen = {id(item) for item in kept}
                late = [item for item in event.images if id(item) not in seen]
                if late:  # an engine that did not hand its batches over on the way
                    keep(late)
                interrupted = interrupted or bool(event.interrupted)
        results[number] = kept
        finished_before += planned[number]
    interrupted = interrupted or control.interrupted
    grids = grids_of(plan, results)
    if grid_dir is not None:
        _save_grids(grids, Path(grid_dir))
    yield PlotResult(plan, grids, results, interrupted, time.perf_counter() - started)


def grids_of(plan: Plan, results: Sequence[Sequence[Any]]) -> list[GridImage]:
    """One grid per Z value from each cell's images (a cell's first image; a missing one blank)."""
    first = next((images[0] for images in results if images), None)
    size = first.image.size if first is not None else (plan.base.width or 64, plan.base.height or 64)
    extra = plan.describe()
    grids: list[GridImage] = []
    per_grid = len(plan.x) * len(plan.y)
    for iz in range(len(plan.z)):
        chunk = results[iz * per_grid : (iz + 1) * per_grid]
        images = [items[0].image if items else None for items in chunk]
        image = draw_grid(
            images,
            columns=len(plan.x),
            cell_size=size,
            x_labels=plan.x.labels if plan.legend and plan.x.used else None,
            y_labels=plan.y.labels if plan.legend and plan.y.used else None,
            title=plan.z.labels[iz] if plan.legend and plan.z.used else None,
        )
        source = next((items[0] for items in chunk if items), first)
        grids.append(GridImage(image, _grid_infotext(source, plan, iz, extra), iz))
    return grids


def _grid_infotext(item: Any, plan: Plan, iz: int, entries: dict[str, str]) -> str:
    shown = dict(entries)
    if plan.z.used:
        shown["Z Value"] = plan.z.labels[iz]
    text = item.parameters.get("infotext", "") if item is not None else ""
    if not text:  # no cell ran: the prompts and the axes
        return format_infotext(plan.base.prompt, plan.base.negative_prompt, shown)
    return f"{text}, {format_infotext('', '', shown)}"  # the axes end the first image's last line


def _save_grids(grids: list[GridImage], directory: Path) -> None:
    from webui.output import save_png

    for grid in grids:
        seed = 0
        match = re.search(r"(?:^|, )Seed: (\d+)", grid.infotext)
        if match is not None:
            seed = int(match.group(1))
        try:
            grid.path = save_png(grid.image, directory, seed=seed, infotext=grid.infotext)
        except OSError as error:  # the grid is still shown; the caller reports the reason
            grid.error = error.strerror or str(error)


def grid_folder(outputs: str | Path, task: str, when: datetime.date | None = None) -> Path:
    """Where a task's plot grids go: ``outputs/<task>-grids/<YYYY-MM-DD>`` (A1111's folder name)."""
    from webui.output import output_dir

    return output_dir(outputs, f"{task}-grids", when)


# -- drawing -----------------------------------------------------------------------------------

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def draw_grid(
    images: Sequence[Image.Image | None],
    *,
    columns: int,
    cell_size: tuple[int, int],
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """``images`` (row by row, ``columns`` wide) as one RGB grid of ``cell_size`` cells on white,
    with ``x_labels`` above the columns, ``y_labels`` left of the rows and ``title`` above all
    (PIL's default font, sized from the cell). A missing image leaves its cell blank; one of
    another size is resized to the cell."""
    width, height = cell_size
    columns = max(1, columns)
    rows = max(1, math.ceil(len(images) / columns))
    font = _font(max(10, (width + height) // 25))
    pad = max(2, font_size(font) // 3)
    line = font_size(font) + pad
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text: str, room: int) -> list[str]:
        return _wrap(scratch, font, text, max(room - 2 * pad, 8))

    top_lines = [wrap(text, width) for text in x_labels] if x_labels else []
    left_width = 0
    left_lines: list[list[str]] = []
    if y_labels:
        widest = max((_text_width(scratch, font, text) for text in y_labels), default=0)
        left_width = min(max(widest + 2 * pad, width // 2), width)
        left_lines = [wrap(text, left_width) for text in y_labels]
    top_height = (max(len(lines) for lines in top_lines) * line + pad) if top_lines else 0
    total_width = left_width + columns * width
    title_lines = wrap(title, total_width) if title else []
    title_height = len(title_lines) * line + pad if title_lines else 0
    grid = Image.new("RGB", (total_width, title_height + top_height + rows * height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    top = title_height + top_height
    for index, image in enumerate(images):
        if image is None:
            continue
        picture = image.convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        grid.paste(picture, (left_width + (index % columns) * width, top + (index // columns) * height))
    _centred(draw, font, title_lines, 0, 0, total_width, title_height, line)
    for column, lines in enumerate(top_lines):
        _centred(draw, font, lines, left_width + column * width, title_height, width, top_height, line)
    for row, lines in enumerate(left_lines[:rows]):
        _centred(draw, font, lines, 0, top + row * height, left_width, height, line)
    return grid


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # an older Pillow, or one without FreeType
        return ImageFont.load_default()


def font_size(font: Any) -> int:
    size = getattr(font, "size", None)
    if isinstance(size, (int, float)) and size > 0:
        return int(size)
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) or 10


def _text_width(draw: ImageDraw.ImageDraw, font: Any, text: str) -> int:
    return int(math.ceil(draw.textlength(text, font=font))) if text else 0


def _wrap(draw: ImageDraw.ImageDraw, font: Any, text: str, room: int) -> list[str]:
    """``text`` in lines no wider than ``room`` pixels (words kept whole where they fit)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if _text_width(draw, font, candidate) <= room:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for char in word:  # a word wider than the room is broken where it must
                if current and _text_width(draw, font, current + char) > room:
                    lines.append(current)
                    current = ""
                current += char
        lines.append(current)
    return lines


def _centred(
    draw: ImageDraw.ImageDraw,
    font: Any,
    lines: Sequence[str],
    left: int,
    top: int,
    width: int,
    height: int,
    line: int,
) -> None:
    if not lines:
        return
    y = top + max(0, (height - len(lines) * line) // 2) + line // 6
    for text in lines:
        x = left + max(0, (width - _text_width(draw, font, text)) // 2)
        draw.text((x, y), text, fill=INK, font=font)
        y += line
