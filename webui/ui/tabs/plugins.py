"""Plugins: every plugin (name, source, version, hooks, status, API versions, the hash of what was
installed), turning installed plugins on and off, installing one from a name or an uploaded wheel,
and "Apply and restart"; and the notice shown at the top of the page when some failed.

Changing plugins runs code on the server, so it is allowed only where the server's
:class:`~webui.ui.server.PluginControl` (``service.plugin_control``) says so: a server listening
on 127.0.0.1 without ``--share``, or one started with ``--enable-plugin-install``. Elsewhere the
controls are shown disabled with the reason, and no handler is connected to them, so the server
has no route that installs, enables or restarts. Everything else is plain Python in
:mod:`webui.plugin_admin`, the same code as ``launch.py plugins``.
"""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from webui.errors import LatentStudioError
from webui.plugin_admin import TRUST, install_prepared, prepare, set_enabled
from webui.ui.controls import UIContext

HEADERS = ["Name", "Source", "Version", "Hooks", "Status", "API", "SHA-256 of what was installed"]
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character
NOT_EMBEDDED = (
    "This server runs inside another program and cannot restart itself: restart that program to "
    "apply changes."
)
# after "Apply and restart": wait until the server has gone away and come back, then reload the page
RELOAD_WHEN_BACK = """
() => {
  const started = Date.now();
  let down = false;
  const poll = () => fetch(window.location.href, {cache: "no-store"})
    .then((answer) => {
      if (answer.ok && (down || Date.now() - started > 20000)) { window.location.reload(); }
      else { setTimeout(poll, 500); }
    })
    .catch(() => { down = true; setTimeout(poll, 500); });
  setTimeout(poll, 500);
}
"""


def escape_markdown(text: str) -> str:
    """``text`` shown as it is by a Markdown renderer: whitespace collapsed to single spaces and
    every ASCII punctuation character backslash-escaped, so no markup or HTML gets through."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _describe(plugins: Any) -> list[dict[str, Any]]:
    describe = getattr(plugins, "describe", None)
    return describe() if callable(describe) else []


def _on_disk(plugins: Any, described: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """Plugins installed since the server started (as rows), and the names of loaded ones that are
    gone from disk; nothing is imported."""
    discover = getattr(plugins, "discover", None)
    if not callable(discover):
        return [], set()
    try:
        found = discover()
        settings = plugins.current_settings()
    except Exception:  # a listing problem must not break the page
        return [], set()
    known = {row["name"] for row in described}
    new = [
        {
            "name": c.name,
            "source": c.source,
            "version": c.version,
            "hooks": [],
            "error": None,
            "enabled": not settings.is_disabled(*c.keys),
            "status": "new",
            "api_versions": None,
            "sha256": None,
            "hashed": None,
        }
        for c in found
        if c.name not in known
    ]
    present = {c.name for c in found}
    gone = {
        row["name"]
        for row in described
        if row["source"] in ("entrypoint", "dropin") and row["name"] not in present
    }
    return new, gone


def status_text(row: dict[str, Any], gone: bool = False) -> str:
    """A row's status in words, with what the next start will change."""
    status, enabled = row.get("status") or ("failed" if row["error"] else "loaded"), row.get("enabled", True)
    if gone:
        return "uninstalled: gone after a restart"
    if status == "new":
        return "installed: loads after a restart" if enabled else "installed, disabled"
    if status == "safe mode":
        return "not loaded: safe mode"
    if status == "not selected":
        return "not loaded: not named by --plugins"
    if status == "disabled":
        return "disabled" if not enabled else "disabled; enabled from the next start"
    text = f"failed: {row['error']}" if row["error"] else "loaded"
    return text if enabled else f"{text}; disabled from the next start"


def rows(plugins: Any) -> list[list[str]]:
    """The table's rows: one per plugin, those that failed first, then the installed and drop-in
    ones, then the built-ins (each in loading order), then the ones installed since the server
    started."""
    described = sorted(_describe(plugins), key=lambda row: (row["error"] is None, row["source"] == "builtin"))
    new, gone = _on_disk(plugins, described)
    table = []
    for row in described + new:
        versions = row.get("api_versions")
        sha = row.get("sha256")
        table.append(
            [
                row["name"],
                row["source"],
                row["version"] or "",
                ", ".join(row["hooks"]),
                status_text(row, row["name"] in gone),
                ", ".join(str(v) for v in versions) if versions else "",
                f"{sha} ({row.get('hashed')})" if sha else "",
            ]
        )
    return table


def choices(plugins: Any) -> list[str]:
    """The plugins that can be turned on or off: installed and drop-in ones (not the built-ins)."""
    return [row[0] for row in rows(plugins) if row[1] in ("entrypoint", "dropin")]


def notice(plugins: Any) -> str | None:
    """Markdown for the top of the page naming the plugins that failed, or ``None`` when none did.
    The names and errors come from plugins, so they are escaped: plain text only."""
    failed = [row for row in _describe(plugins) if row["error"]]
    if not failed:
        return None
    count = f"{len(failed)} plugin{'s' if len(failed) != 1 else ''} failed to load"
    listed = "; ".join(f"{row['name']} — {row['error']}" for row in failed)
    return f"⚠️ **{escape_markdown(count)}:** {escape_markdown(listed)} — see the Plugins tab."


def _mode(plugins: Any) -> str | None:
    if getattr(plugins, "safe_mode", False):
        return "**Safe mode:** only the built-in plugins are loaded (started with `--safe-mode`)."
    only = getattr(plugins, "only", None)
    if only:
        return f"**Only the plugins named by --plugins are loaded:** {escape_markdown(', '.join(only))}"
    return None


def _failed(error: Exception) -> gr.Error:
    return gr.Error(str(error), print_exception=False)


def build(ctx: UIContext) -> None:
    plugins = ctx.service.engine.plugins
    control = getattr(ctx.service, "plugin_control", None)
    problem = (
        "Plugins can be managed here only in a server started by launch.py."
        if control is None
        else control.problem
    )
    allowed = problem is None
    restarts = allowed and control is not None and control.restart is not None
    gr.Markdown(
        "Every plugin, those that failed first, then the installed ones, then the built-ins. A plugin "
        "that failed to load or failed at start-up "
        "is skipped and the rest of the app works without it; fix it, disable it or uninstall it and "
        "restart. `python launch.py plugins list` prints this list as JSON; `python launch.py --safe-mode` "
        "starts with the built-ins only."
    )
    gr.Markdown(
        f"**{TRUST}** Each installed plugin is listed with the SHA-256 of what was installed (a pip "
        "package's wheel, or its RECORD when it was installed another way; a drop-in's file).",
        elem_id="plugins-trust",
    )
    mode = _mode(plugins)
    if mode:
        gr.Markdown(mode, elem_id="plugins-mode")
    # computed again on each page load: a model list refreshed since may have recorded a failure
    table = gr.Dataframe(
        value=lambda: rows(plugins),
        headers=HEADERS,
        datatype="str",
        interactive=False,
        wrap=True,
        column_widths=["15%", "7%", "6%", "17%", "25%", "5%", "25%"],
        label="Plugins",
        show_label=False,
        elem_id="plugins-table",
    )
    if problem:
        gr.Markdown(f"🔒 {problem}", elem_id="plugins-locked")
    elif not restarts:
        gr.Markdown(NOT_EMBEDDED, elem_id="plugins-locked")
    with gr.Row():
        choice = gr.Dropdown(
            choices=choices(plugins),
            value=None,
            label="Plugin",
            allow_custom_value=True,
            interactive=allowed,
            scale=4,
            elem_id="plugins-choice",
        )
        enable = gr.Button("Enable", interactive=allowed, elem_id="plugins-enable")
        disable = gr.Button("Disable", interactive=allowed, elem_id="plugins-disable")
    with gr.Accordion("Install a plugin", open=True):
        with gr.Row():
            spec = gr.Textbox(
                label="Package name or URL (PyPI wheels; build from source on the command line)",
                placeholder="latent-studio-example-plugin",
                interactive=allowed,
                scale=3,
                elem_id="plugins-spec",
            )
            wheel = gr.File(
                label="or upload a wheel (.whl)",
                file_types=[".whl"],
                type="filepath",
                interactive=allowed,
                scale=2,
                height=120,
                elem_id="plugins-wheel",
            )
        check = gr.Button("Check what will be installed", interactive=allowed, elem_id="plugins-check")
        plan = gr.Textbox(label="What will be installed", lines=8, interactive=False, elem_id="plugins-plan")
        install = gr.Button("Install", variant="primary", interactive=False, elem_id="plugins-install")
    restart = gr.Button(
        "Apply and restart", variant="secondary", interactive=restarts, elem_id="plugins-restart"
    )
    message = gr.Textbox(label="Result", interactive=False, elem_id="plugins-message")
    if not allowed or control is None:
        return  # no handler: this server has no route that changes plugins
    # a checked package waiting for "Install"; its temporary folder goes when the session does
    prepared = gr.State(
        None, time_to_live=3600, delete_callback=lambda ready: ready.close() if ready else None
    )
    plugin_dirs = getattr(plugins, "plugin_dirs", None)

    def toggle(name: str | None, on: bool) -> tuple[str, list[list[str]]]:
        if not name:
            raise gr.Error("Choose a plugin first.", print_exception=False)
        try:
            return set_enabled(name, on, plugin_dirs=plugin_dirs), rows(plugins)
        except LatentStudioError as error:
            raise _failed(error) from None

    enable.click(
        lambda name: toggle(name, True), inputs=choice, outputs=[message, table], api_name="plugins_enable"
    )
    disable.click(
        lambda name: toggle(name, False), inputs=choice, outputs=[message, table], api_name="plugins_disable"
    )

    def check_package(name: str | None, upload: str | None, previous: Any) -> tuple[Any, ...]:
        if previous is not None:
            previous.close()
        if upload and name and name.strip():
            raise gr.Error("Give a package name or upload a wheel, not both.", print_exception=False)
        if not upload and not (name and name.strip()):
            raise gr.Error("Type a package name or upload a wheel first.", print_exception=False)
        try:
            ready = prepare(str(upload or name), from_web=True)
        except LatentStudioError as error:
            raise _failed(error) from None
        return (
            ready.summary(),
            ready,
            gr.Button(interactive=True),
            "Read what will be installed, then press Install.",
        )

    check.click(
        check_package,
        inputs=[spec, wheel, prepared],
        outputs=[plan, prepared, install, message],
        api_name="plugins_check",
    )

    def install_package(ready: Any) -> tuple[Any, ...]:
        if ready is None or ready.closed:
            raise gr.Error("Check a package first.", print_exception=False)
        try:
            done = install_prepared(ready)
        except LatentStudioError as error:
            raise _failed(error) from None
        return done, None, gr.Button(interactive=False), rows(plugins), gr.Dropdown(choices=choices(plugins))

    install.click(
        install_package,
        inputs=prepared,
        outputs=[message, prepared, install, table, choice],
        api_name="plugins_install",
    )

    if not restarts:
        return

    def restart_server() -> str:
        running = ctx.service.sessions_running()
        if running:
            raise gr.Error(
                f"{running} generation{'s are' if running != 1 else ' is'} running; restart when "
                f"{'they have' if running != 1 else 'it has'} finished.",
                print_exception=False,
            )
        control.restart()
        return "Restarting: the page reloads when the server is back."

    restart.click(restart_server, outputs=message, api_name="plugins_restart").success(
        None, js=RELOAD_WHEN_BACK
    )
