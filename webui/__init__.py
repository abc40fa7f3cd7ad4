"""Latent Studio: one latent-diffusion engine, pluggable conditionings, a web UI on top."""

from __future__ import annotations

__version__ = "0.1.0"
