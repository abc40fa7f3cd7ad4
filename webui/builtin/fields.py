"""Built-in fields and tasks, registered through the same hooks a community plugin uses, and the
infotext entries of every field whose declaration asks the host to record it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webui.api import BUILTIN_FIELDS, BUILTIN_TASKS, GenerationRequest, OutputImage, RunContext, hookimpl

LATENT_STUDIO_API = 1


@hookimpl
def register_tasks(register: Callable[..., Any]) -> None:
    for spec in BUILTIN_TASKS:
        register(spec)


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    for declared in BUILTIN_FIELDS:
        register(declared)


@hookimpl(trylast=True)
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    """After every other writer: the entries of fields declared with ``record="changed"`` or
    ``"always"`` (a plugin's field needs no ``write_metadata`` of its own)."""
    fields = context.fields
    if fields is not None:
        fields.record(parameters, request)
