"""The engine: torch and diffusers, never gradio."""
