"""The web app: tabs collected from plugins, one queue, one generation at a time on the device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.ui.controls import TAB_ID, UIContext, generation_tab, keep_checks
from webui.ui.service import StudioService
from webui.ui.tabs.plugins import escape_markdown
from webui.ui.tabs.plugins import notice as plugin_notice

__all__ = ["BUSY_MESSAGE", "TabSpec", "build_app", "collect_tabs", "configure_queue"]

log = logging.getLogger(__name__)

TITLE = "Latent Studio"
BUSY_MESSAGE = "The server is busy: {size} generations are already waiting. Please try again in a moment."
CSS = """
.ls-legend { font-size: 0.85em; line-height: 1.6; max-height: 7em; overflow-y: auto; }
"""


@dataclass(frozen=True)
class TabSpec:
    """A tab registered through ``register_ui_tabs``: its ``build(ui)``, or the ``task`` whose
    generation tab the core builds from the field registry."""

    id: str
    label: str
    build: Callable[[UIContext], Any]
    order: int = 100
    task: str | None = None


def collect_tabs(plugins: Any) -> list[TabSpec]:
    """Every registered tab, in display order; the first registration of an id wins.

    ``register(id, label, build=None, order=100, task=None)``: with ``task`` and no ``build`` the
    tab is the task's generation tab, derived from its fields (a plugin needs no gradio for it).
    """
    specs: dict[str, TabSpec] = {}

    def register(
        id: str,
        label: str,
        build: Callable[[UIContext], Any] | None = None,  # noqa: A002
        order: int = 100,
        task: str | None = None,
    ) -> None:
        if (
            not id
            or not isinstance(id, str)
            or not (callable(build) or (build is None and isinstance(task, str)))
        ):
            raise TypeError(
                f"register_ui_tabs: register(id, label, build=None, order=100, task=None) needs a "
                f"build function or a task, got {id!r}, {build!r}, task={task!r}"
            )
        if build is None:
            build = _task_tab(str(task))
        specs.setdefault(id, TabSpec(id=id, label=str(label), build=build, order=int(order), task=task))

    plugins.hook.register_ui_tabs(register=register)
    return sorted(specs.values(), key=lambda spec: (spec.order, spec.id))


def _task_tab(task: str) -> Callable[[UIContext], Any]:
    def build(ui: UIContext) -> Any:
        return generation_tab(ui, task)

    return build


def build_app(service: StudioService, *, plugins: Any | None = None) -> gr.Blocks:
    """The gradio app over ``service``'s engine. Tabs come from the ``register_ui_tabs`` hook."""
    engine = service.engine
    plugins = plugins if plugins is not None else engine.plugins
    specs = collect_tabs(plugins)  # start-up hooks are guarded: a failing plugin is recorded, not raised
    failed = plugin_notice(plugins)  # after collect_tabs, so a failed register_ui_tabs is listed too
    ctx = UIContext(
        service=service,
        samplers=engine.schedulers.names(),
        default_model=service.default_model_name(),
        labels={spec.id: spec.label for spec in specs},
    )
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}")
        if failed:
            gr.Markdown(failed, elem_id="plugin-notice", latex_delimiters=[])
        if ctx.default_model is None:
            gr.Markdown(
                "**No model found.** Put a diffusers model folder into the models folder and press ↻."
            )
        with gr.Tabs(elem_id="tabs") as selector:
            ctx.selector = selector
            for spec in specs:
                if not TAB_ID.match(spec.id):  # ids make element ids and endpoint names: refused, shown
                    log.error(
                        "tab %r (%s) refused: its id must be 1 to 64 lowercase letters, digits, '-' and '_', "
                        "starting with a letter",
                        spec.id[:80],
                        spec.label,
                    )
                    with gr.Tab(spec.label):
                        gr.Markdown(
                            f"**This tab was not loaded:** its id {escape_markdown(repr(spec.id)[:80])} "
                            "must be 1 to 64 lowercase letters, digits, \\- and \\_, starting with a letter."
                        )
                    continue
                with gr.Tab(spec.label, id=spec.id, elem_id=f"tab-{spec.id}"):
                    ctx.current_tab = spec.id
                    try:
                        spec.build(ctx)
                    except Exception as error:  # one broken plugin tab must not take the app down
                        log.exception("tab %s failed to build", spec.id)
                        gr.Markdown(f"**This tab failed to load:** `{type(error).__name__}: {error}`")
                    finally:
                        ctx.current_tab = None
            for callback in ctx.deferred:  # e.g. PNG Info's "Send to" for tabs built after it
                try:
                    callback()
                except Exception:
                    log.exception("a tab's late wiring failed")

        def leave(request: gr.Request) -> None:
            """A closed browser tab stops its generation: nobody is left waiting for it."""
            if request is not None and request.session_hash:
                service.interrupt(request.session_hash)

        demo.unload(leave)
    keep_checks(demo)
    return demo


def configure_queue(demo: gr.Blocks, max_size: int) -> gr.Blocks:
    """One generation at a time (every Generate shares one concurrency slot) and at most
    ``max_size`` generations waiting; one more gets :data:`BUSY_MESSAGE` at once. Light events
    (Interrupt, Skip, refresh, PNG Info) are never refused, so a full queue can still be stopped.

    The bound is shared with the HTTP API: its waiting jobs (``demo.other_generations_waiting()``,
    set when the API is mounted) count here, and ``demo.generations_waiting()`` counts the clicks
    waiting here for the API's own check."""
    from webui.ui.controls import BUSY_CONCURRENCY_ID

    demo.queue(default_concurrency_limit=1)
    queue = getattr(demo, "_queue", None)
    push = getattr(queue, "push", None)
    if queue is None or push is None:  # pragma: no cover - gradio internals moved: no bound, still safe
        log.warning("cannot bound the generation queue with this gradio version")
        return demo

    def waiting() -> int:
        generations = queue.event_queue_per_concurrency_id.get(BUSY_CONCURRENCY_ID)
        return len(generations.queue) if generations is not None else 0

    def others() -> int:
        """Generations waiting elsewhere for the same device (the HTTP API's queued jobs)."""
        count = getattr(demo, "other_generations_waiting", None)
        return int(count()) if callable(count) else 0

    async def push_or_busy(*args: Any, **kwargs: Any) -> Any:
        body = kwargs.get("body", args[0] if args else None)
        fn_index = getattr(body, "fn_index", None)
        fns = getattr(demo, "fns", {})
        fn = fns.get(fn_index) if isinstance(fns, dict) else None
        if (
            fn is not None
            and getattr(fn, "concurrency_id", None) == BUSY_CONCURRENCY_ID
            and waiting() + others() >= max_size
        ):
            return False, BUSY_MESSAGE.format(size=max_size), "queue_full"
        return await push(*args, **kwargs)

    queue.push = push_or_busy  # type: ignore[method-assign]
    demo.generations_waiting = waiting  # the HTTP API counts these against the same bound
    return demo
