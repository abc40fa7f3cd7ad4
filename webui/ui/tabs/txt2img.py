"""Text to image: the shared controls and nothing else."""

from __future__ import annotations

from webui.ui.controls import GenerationTab, UIContext, generation_tab


def build(ctx: UIContext) -> GenerationTab:
    return generation_tab(ctx, "txt2img", extras=lambda values: {})
