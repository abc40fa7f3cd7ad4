"""Plugins: a read-only table of every plugin (name, source, version, hooks, status), and the
notice shown at the top of the page when some failed."""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from webui.ui.controls import UIContext

HEADERS = ["Name", "Source", "Version", "Hooks", "Status"]
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def escape_markdown(text: str) -> str:
    """``text`` shown as it is by a Markdown renderer: whitespace collapsed to single spaces and
    every ASCII punctuation character backslash-escaped, so no markup or HTML gets through."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _describe(plugins: Any) -> list[dict[str, Any]]:
    describe = getattr(plugins, "describe", None)
    return describe() if callable(describe) else []


def rows(plugins: Any) -> list[list[str]]:
    """The table's rows: one per plugin, those that failed first, else in loading order."""
    described = sorted(_describe(plugins), key=lambda row: row["error"] is None)
    return [
        [row["name"], row["source"], row["version"] or "", ", ".join(row["hooks"]),
         f"failed: {row['error']}" if row["error"] else "loaded"]
        for row in described
    ]


def notice(plugins: Any) -> str | None:
    """Markdown for the top of the page naming the plugins that failed, or ``None`` when none did.
    The names and errors come from plugins, so they are escaped: plain text only."""
    failed = [row for row in _describe(plugins) if row["error"]]
    if not failed:
        return None
    count = f"{len(failed)} plugin{'s' if len(failed) != 1 else ''} failed to load"
    listed = "; ".join(f"{row['name']} — {row['error']}" for row in failed)
    return f"⚠️ **{escape_markdown(count)}:** {escape_markdown(listed)} — see the Plugins tab."


def build(ctx: UIContext) -> None:
    plugins = ctx.service.engine.plugins
    gr.Markdown("Installed plugins, those that failed first. A plugin that failed to load or failed at start-up "
                "is skipped and the rest of the app works without it; fix or remove it and restart. "
                "`python launch.py plugins` prints this list as JSON.")
    # computed again on each page load: a model list refreshed since may have recorded a failure
    gr.Dataframe(value=lambda: rows(plugins), headers=HEADERS, datatype="str", interactive=False, wrap=True,
                 column_widths=["20%", "8%", "7%", "25%", "40%"], label="Plugins", show_label=False,
                 elem_id="plugins-table")
