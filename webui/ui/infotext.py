"""From a parsed ``parameters`` text (ours or AUTOMATIC1111's) to the values of a generation tab."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "clamp_fields", "fields_from_parameters", "unreadable_numbers"]

_NUMBERS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Denoising strength": ("strength", float),
    "Mask blur": ("mask_blur", int),
    "Clip skip": ("clip_skip", int),
    "ControlNet weight": ("control_scale", float),
    "Batch size": ("batch_size", int),
}


def fields_from_parameters(parsed: Mapping[str, Any], samplers: Iterable[str] = ()) -> dict[str, Any]:
    """The tab fields (request field names) that ``parsed`` sets; keys it lacks are left out.

    A1111 since 1.9 writes the scheduler apart (``Sampler: DPM++ 2M, Schedule type: Karras``); the
    two are joined when the joined name is one of ``samplers``. Unreadable numbers are skipped.
    """
    fields: dict[str, Any] = {}
    if "Prompt" in parsed:
        fields["prompt"] = str(parsed["Prompt"])
    if "Negative prompt" in parsed:
        fields["negative_prompt"] = str(parsed["Negative prompt"])
    for key, (name, kind) in _NUMBERS.items():
        if key in parsed:
            number = _number(parsed[key], kind)
            if number is not None:
                fields[name] = number
    sampler = parsed.get("Sampler")
    if sampler:
        known = set(samplers)
        schedule = str(parsed.get("Schedule type", "")).strip()
        joined = f"{sampler} {schedule}".strip()
        if schedule and schedule.lower() not in ("automatic", "uniform") and (not known or joined in known):
            sampler = joined
        if not known or sampler in known:
            fields["sampler"] = str(sampler)
    if parsed.get("Model"):
        fields["model"] = str(parsed["Model"])
    if parsed.get("VAE"):  # A1111 writes the file name; the VAE picker lists names without extensions
        vae = str(parsed["VAE"])
        for suffix in (".safetensors", ".ckpt", ".pt"):
            vae = vae.removesuffix(suffix)
        fields["vae"] = vae
    return fields


def _number(text: Any, kind: type) -> int | float | None:
    """``text`` as an int (exactly, also "20.0") or a finite float; None when it is neither."""
    text = str(text).strip()
    if len(text) > 100:  # no number worth sending is this long (and int() of it would be slow)
        return None
    try:
        if kind is int:
            try:
                return int(text)
            except ValueError:
                value = float(text)
                return int(value) if math.isfinite(value) else None
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def unreadable_numbers(parsed: Mapping[str, Any]) -> list[str]:
    """Notes for the numbers in ``parsed`` that :func:`fields_from_parameters` leaves out."""
    return [f"{key} {_shown(parsed[key])} is not a number; not sent" for key, (_, kind) in _NUMBERS.items()
            if key in parsed and _number(parsed[key], kind) is None]


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
                notes.append(f"{bounds.label} has {len(value)} characters, over the limit of {bounds.max_chars}; "
                             f"kept the first {bounds.max_chars}")
                value = value[:bounds.max_chars]
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
            out_of_range = ((bounds.minimum is not None and value < bounds.minimum)
                            or (bounds.maximum is not None and value > bounds.maximum))
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
