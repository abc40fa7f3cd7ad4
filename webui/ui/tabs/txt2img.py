"""Text to image: the task's fields and nothing else."""

from __future__ import annotations

from webui.ui.controls import GenerationTab, UIContext, generation_tab


def build(ctx: UIContext) -> GenerationTab:
    return generation_tab(ctx, "txt2img")
