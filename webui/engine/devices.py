"""Choosing the device and dtype."""

from __future__ import annotations

import torch

from webui.errors import InvalidRequestError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on GPUs and fp32 on the CPU (fp16 is slow or unsupported there)."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
