"""The gradio web app: tabs from plugins over the one engine (gradio here, never torch)."""
