"""From a parsed ``parameters`` text (ours or AUTOMATIC1111's) to the values of a generation tab.

Which entries are read, and how, comes from the field declarations (``webui.fields``): a field with
an infotext key (or a ``read`` function) and ``send=True`` is read by the field registry; this
module adds what only the web app knows (which models and samplers are on offer now) and brings
numbers into each control's range, with a note for everything it changed or left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webui.fields import FieldRegistry

__all__ = ["Range", "clamp_fields", "fields_from_infotext"]


def fields_from_infotext(
    registry: FieldRegistry,
    parsed: Mapping[str, Any],
    *,
    task: str | None = None,
    names: Iterable[str] | None = None,
    offered: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The field values (by field name) that ``parsed`` sets, and one note per entry left out.

    Entries are read through :meth:`FieldRegistry.from_infotext` (numbers as written, also out of
    range: :func:`clamp_fields` brings them into the controls' ranges; an unreadable one gets
    "Steps 'many' is not a number; not sent"). ``offered`` lists, by field name, what a choice
    field offers now: a value not among them is left out with a note ("model 'x' is not
    installed; kept the current model"), unless the entry as written is offered (A1111's
    "Sampler: Euler" with a "Schedule type" our sampler list does not join it with).
    """
    values, notes = registry.from_infotext(parsed, task=task, names=names, bounded=False)
    offered = offered or {}
    for name in [name for name in values if name in offered]:  # in the registry's order
        choices = offered[name]
        declared = registry[name]
        if declared.multiple:  # a list of names (styles): those on offer are sent, the others named
            missing = [item for item in values[name] if item not in choices]
            values[name] = tuple(item for item in values[name] if item in choices)
            if missing:
                shown = ", ".join(repr(item[:80]) for item in missing[:5])
                notes.append(f"{_noun(declared.label)} not available: {shown}; left out")
            continue
        if values[name] in choices:
            continue
        written = parsed.get(declared.infotext) if declared.infotext else None
        if written is not None and str(written).strip() in choices:
            values[name] = str(written).strip()
            continue
        what = _noun(declared.label)
        where = "installed" if (declared.source or "").startswith("models:") else "available"
        notes.append(f"{what} {str(values.pop(name))[:80]!r} is not {where}; kept the current {what}")
    return values, notes


def _noun(label: str) -> str:
    """A label inside a sentence: "Model" -> "model", "VAE" and "ControlNet" as they are."""
    first = label.split(" ")[0]
    return label[:1].lower() + label[1:] if first[1:].islower() else label


@dataclass(frozen=True)
class Range:
    """What a control accepts: numbers within [minimum, maximum] (whole numbers on a grid of
    ``step`` from ``minimum`` when ``step`` is a whole number above 1, as sizes in 8s), text of at
    most ``max_chars`` characters. ``None`` = no bound."""

    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    max_chars: int | None = None


def clamp_fields(fields: Mapping[str, Any], ranges: Mapping[str, Range]) -> tuple[dict[str, Any], list[str]]:
    """``fields`` with each value brought into its control's range, and one note per change
    (``"Steps 99999999999999999999 is out of range; kept 150"``). Fields without a range pass."""
    kept: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in fields.items():
        bounds = ranges.get(name)
        if bounds is None:
            kept[name] = value
            continue
        if isinstance(value, str):
            if bounds.max_chars and len(value) > bounds.max_chars:
                notes.append(
                    f"{bounds.label} has {len(value)} characters, over the limit of {bounds.max_chars}; "
                    f"kept the first {bounds.max_chars}"
                )
                value = value[: bounds.max_chars]
            kept[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kept[name] = value
            continue
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{bounds.label} {value} is not a number; not sent")
            continue
        new = _clamp(value, bounds)
        if new != value:
            out_of_range = (bounds.minimum is not None and value < bounds.minimum) or (
                bounds.maximum is not None and value > bounds.maximum
            )
            why = "is out of range" if out_of_range else f"is not a multiple of {_shown(bounds.step)}"
            notes.append(f"{bounds.label} {_shown(value)} {why}; kept {_shown(new)}")
        kept[name] = new
    return kept, notes


def _clamp(value: int | float, bounds: Range) -> int | float:
    low, high, step = bounds.minimum, bounds.maximum, bounds.step
    if not isinstance(value, int):
        if low is not None and value < low:
            value = float(low)
        if high is not None and value > high:
            value = float(high)
        return value
    low_int = math.ceil(low) if low is not None else None
    high_int = math.floor(high) if high is not None else None
    if low_int is not None:
        value = max(value, low_int)
    if high_int is not None:
        value = min(value, high_int)
    if step is not None and float(step).is_integer() and step > 1:  # sizes: onto the slider's grid
        grid = int(step)
        origin = low_int if low_int is not None else 0
        steps, rest = divmod(value - origin, grid)
        value = origin + (steps + (1 if 2 * rest >= grid else 0)) * grid
        if high_int is not None and value > high_int:
            value -= grid
    return value


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
