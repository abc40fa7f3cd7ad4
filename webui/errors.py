"""Typed exceptions. Every error a user can cause derives from :class:`LatentStudioError`.

The CLI prints ``str(error)`` on one line and exits non-zero; the UI shows it as a message. The
message is written for the user: what was wrong and what to do about it.
"""

from __future__ import annotations


class LatentStudioError(Exception):
    """Base class of all errors caused by user input or the environment (not by bugs)."""


class InvalidRequestError(LatentStudioError, ValueError):
    """A generation request has a bad parameter (size, steps, strength, sampler, image...)."""


class UnknownSamplerError(InvalidRequestError):
    """The sampler name is not in the scheduler registry."""


class ModelNotFoundError(LatentStudioError, FileNotFoundError):
    """A model path or name does not exist."""


class ModelLoadError(LatentStudioError):
    """A model exists but cannot be loaded (corrupt file, wrong layout, unsafe format)."""


class NoModelError(LatentStudioError):
    """No model was given and no default model is installed."""


class PluginError(LatentStudioError):
    """A plugin registered something invalid (duplicate name, wrong type), or a plugin's hook
    failed during a request (the message names the plugin and the hook)."""


class OutOfMemoryError(LatentStudioError):
    """A generation did not fit into memory even with the lowest-memory plan."""


class GenerationError(LatentStudioError):
    """A generation ran but could not produce a usable image (e.g. the VAE decoded to NaN)."""


class QueueFull(LatentStudioError):
    """Too many generations are waiting (here, or in the Ray Serve replicas' queue);
    ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 10) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReplicaLost(GenerationError):
    """The Ray Serve replica running a generation stopped (its process or node died) and the
    request could not be finished on another one."""
