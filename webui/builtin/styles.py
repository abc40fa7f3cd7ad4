"""Built-in prompt styles (AUTOMATIC1111's ``styles.csv``).

The request field ``styles`` (a list of style names, on every generation tab: a multi-select whose
choices are the styles on offer, ``--styles NAME`` repeatable on the command line, the ``styles``
key of the HTTP API's bodies) names the styles applied, in order, to the prompt and the negative
prompt in ``prepare_request``: a style's text wraps the prompt at its ``{prompt}`` placeholder, or
is appended after ", ". An unknown name fails the request with one line naming the closest ones.
A prompt that already carries every chosen style (the final prompt of an image, sent back from
PNG Info with its styles) is not styled twice.

The infotext keeps the final prompts and, when styles were chosen, ``Styles array: ["a", "b"]``
(the key A1111 reads them back under); PNG Info sends them back. Where the styles come from and
how they are read and saved: :mod:`webui.styles`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webui.api import GenerationRequest, RunContext, apply_styles, check_names, hookimpl, load_styles

LATENT_STUDIO_API = 1
FIELD = "styles"  # the request field (request.extra["styles"])
INFOTEXT = "Styles array"


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    register(
        FIELD,
        "choice",
        default=(),
        choices="styles",
        multiple=True,
        label="Styles",
        group="prompt",
        help="prompt styles from styles.csv, applied in the order chosen",
        infotext=INFOTEXT,
    )


def chosen(request: GenerationRequest) -> tuple[str, ...]:
    """The style names the request asks for (none when the field is not there)."""
    return tuple(request.extra.get(FIELD) or ())


@hookimpl(tryfirst=True)  # before the prompt is read by anything else (LoRA names in a style too)
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    names = chosen(request)
    if not names:
        return
    styles = check_names(names, load_styles(context.engine))
    request.prompt, request.negative_prompt = apply_styles(request.prompt, request.negative_prompt, styles)
