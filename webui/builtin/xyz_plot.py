"""Built-in X/Y/Z plot: the request fields of the "X/Y/Z plot" group on the txt2img and img2img tabs.

The fields are the plot's settings: on/off, each axis's type and values, the legend and whether a
seed of -1 stays random in every cell. The web UI derives the group's controls from them (a closed
"X/Y/Z plot" accordion; the type dropdowns list every axis ``webui.plot.axis_types`` offers, plugin
fields included), the HTTP API accepts them by name (and A1111's ``script_name: "x/y/z plot"``),
and ``launch.py generate --x ...`` sets them. A request with ``xyz_enabled`` on is run by the web
app and the API as a plot (``webui.plot``); the engine itself runs one cell at a time and ignores
these fields. Nothing here is recorded in an image's infotext: the grid's ``parameters`` say how
it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webui.api import hookimpl

LATENT_STUDIO_API = 1
GROUP = "X/Y/Z plot"
TASKS = ("txt2img", "img2img")
# the built-in axis types, offered by the dropdowns (the web UI adds every sweepable field)
AXIS_TYPES = (
    "Nothing",
    "Seed",
    "Steps",
    "CFG Scale",
    "Sampler",
    "Checkpoint",
    "VAE",
    "Denoising strength",
    "Prompt S/R",
)
VALUES_HELP = "comma-separated; numbers take ranges: 1-5, 1-10 (+2), 0.5-1.5 [3]"


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    common: dict[str, Any] = {"group": GROUP, "tasks": TASKS, "cli": False, "send": False}
    register(
        "xyz_enabled",
        "bool",
        default=False,
        label="Enable X/Y/Z plot",
        help="Generate runs every combination of the axes and draws a grid",
        **common,
    )
    register("xyz_draw_legend", "bool", default=True, label="Draw legend", **common)
    register(
        "xyz_keep_seeds",
        "bool",
        default=False,
        label="Keep -1 for seeds",
        help="a seed of -1 is random in every cell (off: one random seed for the whole plot)",
        **common,
    )
    for axis in ("x", "y", "z"):
        letter = axis.upper()
        register(
            f"xyz_{axis}_type",
            "text",
            default="Nothing",
            choices=AXIS_TYPES,
            widget="dropdown",
            max_chars=100,
            label=f"{letter} type",
            **common,
        )
        register(
            f"xyz_{axis}_values",
            "text",
            default="",
            max_chars=10_000,
            label=f"{letter} values",
            help=VALUES_HELP if axis == "x" else None,
            **common,
        )
