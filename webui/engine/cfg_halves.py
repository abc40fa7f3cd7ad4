"""The two halves of a classifier-free-guidance batch, computed once where they are the same.

With CFG the UNet runs on a batch of two halves, unconditional and conditional, that share the
latents and the timestep and differ only in the text. Nothing reads the text before the first
cross-attention, so up to there both halves compute the same numbers: in SD 1.x and 2.x the first
ResNet block and the self-attention of the first transformer block, at the full latent size — the
most expensive attention layer of the UNet (one of five at 4,096 tokens for SD 1.5 at 512x512).
:func:`shared` gives those two modules a ``forward`` that checks that its inputs' halves are equal
(``torch.equal``: exact, about a millisecond), runs the module on one half and returns it twice;
anything else — a batch whose halves differ (SDXL adds the pooled text to the timestep embedding;
a batch without CFG; a plugin that changes the first block's input per half), gradients, inputs
that are not batched alike — runs the module as before. So the output is what the module computes
for that input; only the work is halved.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["shared", "targets"]


def targets(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules before the first cross-attention of each UNet-like module in ``modules`` (the
    UNet, ControlNets): the first down block's first ResNet and its first transformer block's
    self-attention, where they exist and have no ``forward`` of their own already."""
    found: list[torch.nn.Module] = []
    for root in modules:
        blocks = getattr(root, "down_blocks", None)
        if not blocks:
            continue
        first = blocks[0]
        resnets = getattr(first, "resnets", None)
        if resnets:
            found.append(resnets[0])
        attentions = getattr(first, "attentions", None)
        transformer_blocks = getattr(attentions[0], "transformer_blocks", None) if attentions else None
        attn1 = getattr(transformer_blocks[0], "attn1", None) if transformer_blocks else None
        if attn1 is not None and not getattr(attn1, "is_cross_attention", True):
            found.append(attn1)
    return [module for module in found if "forward" not in module.__dict__]


def _same_halves(tensors: list[torch.Tensor], batch: int) -> bool:
    half = batch // 2
    return all(
        t.dim() > 0 and t.shape[0] == batch and not t.requires_grad and torch.equal(t[:half], t[half:])
        for t in tensors
    )


def _forward(module: torch.nn.Module, counts: dict[str, int]) -> Callable[..., Any]:
    original = types.MethodType(type(module).forward, module)

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        batch = (
            hidden_states.shape[0] if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() else 0
        )
        tensors = [hidden_states, *(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))]
        if batch < 2 or batch % 2 or torch.is_grad_enabled() or not _same_halves(tensors, batch):
            return original(hidden_states, *args, **kwargs)

        def half(value: Any) -> Any:
            return value[: batch // 2] if isinstance(value, torch.Tensor) else value

        out = original(half(hidden_states), *map(half, args), **{k: half(v) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor):  # not a module of the kind this is for
            return original(hidden_states, *args, **kwargs)
        counts["cfg_halves"] += 1
        return torch.cat([out, out])

    return forward


@contextlib.contextmanager
def shared(modules: Iterable[torch.nn.Module], counts: dict[str, int]) -> Iterator[None]:
    """:func:`targets` of ``modules`` compute equal halves once for the ``with`` block (counted in
    ``counts["cfg_halves"]``); their own ``forward`` is back afterwards, also after an error."""
    counts.setdefault("cfg_halves", 0)
    patched = targets(modules)
    for module in patched:
        module.forward = _forward(module, counts)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
