"""Image to image: the task's fields (the init image upload and the denoising strength among them)."""

from __future__ import annotations

from webui.ui.controls import GenerationTab, UIContext, generation_tab


def build(ctx: UIContext) -> GenerationTab:
    return generation_tab(ctx, "img2img")
