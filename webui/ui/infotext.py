"""From a parsed ``parameters`` text (ours or AUTOMATIC1111's) to the values of a generation tab."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["fields_from_parameters"]

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
            try:
                fields[name] = kind(float(parsed[key])) if kind is int else kind(parsed[key])
            except (TypeError, ValueError):
                continue
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
