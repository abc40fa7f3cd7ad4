"""Built-in token merging (Bolya and Hoffman 2023, "Token Merging for Fast Stable Diffusion"): an
opt-in approximation that makes the self-attention of the UNet's highest-resolution transformer
blocks run on fewer tokens.

In each such block the tokens are split into destinations, one per 2x2 cell of the token grid,
chosen at random, and sources (every other token). Each source is paired with its most similar
destination (cosine similarity); the ``r`` best-paired sources, ``r`` being the ratio times the
number of tokens (at most every source: three tokens in four), are averaged into their
destinations. Self-attention then runs on the remaining tokens, and its output is spread back:
a merged source takes its destination's output, every other token its own. Only the
self-attention is merged; the cross-attention and the feed-forward still see every token.

The blocks merged are those of the highest-resolution level of the UNet that has self-attention
(SD 1.x/2.x: the first, 64x64 tokens at 512x512; SDXL, whose first level has no attention: the
second), in its down and up blocks. The merging is put on the attention modules with forward
hooks for the request only (``patch_model``) and removed when it ends, so the cached model is
unchanged for the next request; it works with every attention backend (SDPA, sliced, xformers),
which only ever see fewer tokens.

The random choice of destinations is drawn per image from its seed and the step, so an image is
reproducible, also within a batch. The ratio is the request field ``token_merging_ratio`` (0, the
default, is off), declared with ``register_fields``: its control, command-line flag, infotext entry
(``Token merging ratio: r``, as A1111 writes it) and PNG Info's reading come from that declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from webui.api import (
    DenoiseStep,
    GenerationRequest,
    InvalidRequestError,
    ModelPatches,
    RunContext,
    hookimpl,
)

LATENT_STUDIO_API = 1
FIELD = "token_merging_ratio"  # the request field (request.extra["token_merging_ratio"])
INFOTEXT = "Token merging ratio"  # A1111's infotext key
GROUP = "Approximations"  # the accordion of the opt-in approximations (with DeepCache)
STATE = "token_merging"  # RunContext.state key: the request's TokenMerger
MAXIMUM = 0.9


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    register(
        FIELD,
        "float",
        default=0.0,
        minimum=0.0,
        maximum=MAXIMUM,
        step=0.05,
        label="Token merging ratio",
        group=GROUP,
        help="merge this share of the tokens in the highest-resolution self-attention: faster, "
        "slightly different images (0 = off, 0.3 to 0.5 is typical)",
        infotext=INFOTEXT,
    )


def merging_ratio(request: GenerationRequest) -> float:
    """The request's token merging ratio (0 when it is off)."""
    return float(request.extra.get(FIELD) or 0.0)


# -- which blocks -------------------------------------------------------------------------------


def merge_targets(unet: Any) -> list[tuple[Any, list[Any]]]:
    """The transformers of ``unet``'s highest-resolution level that has self-attention, each with
    the self-attention modules (``attn1``) of its transformer blocks. The level of a block is the
    number of times the latents were halved before it (down block ``i``: ``i``; up block ``j`` of
    ``n``: ``n - 1 - j``). Empty when the UNet has no such block."""
    found: list[tuple[int, Any, list[Any]]] = []
    down_blocks = list(getattr(unet, "down_blocks", None) or [])
    up_blocks = list(getattr(unet, "up_blocks", None) or [])
    placed = [(level, block) for level, block in enumerate(down_blocks)]
    placed += [(len(up_blocks) - 1 - index, block) for index, block in enumerate(up_blocks)]
    for level, block in placed:
        for transformer in getattr(block, "attentions", None) or []:
            attentions = [
                inner.attn1
                for inner in getattr(transformer, "transformer_blocks", None) or []
                if getattr(inner, "attn1", None) is not None
                and not getattr(inner, "only_cross_attention", False)
                and not getattr(inner.attn1, "is_cross_attention", False)
            ]
            if attentions:
                found.append((level, transformer, attentions))
    if not found:
        return []
    top = min(level for level, _, _ in found)
    return [(transformer, attentions) for level, transformer, attentions in found if level == top]


# -- the merging --------------------------------------------------------------------------------


def partition(
    height: int, width: int, seeds: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, sources) and (B, destinations) token indices of a ``height`` x ``width`` grid (raster
    order): one destination per whole 2x2 cell, at a random place in it drawn from each row's seed;
    every other token is a source."""
    cells_y, cells_x = height // 2, width // 2
    sources, targets = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed) % 2**63)
        place = torch.randint(4, (cells_y, cells_x), generator=generator)  # 0..3: where in its 2x2 cell
        ys = torch.arange(cells_y).unsqueeze(1) * 2 + place // 2
        xs = torch.arange(cells_x).unsqueeze(0) * 2 + place % 2
        is_destination = torch.zeros(height * width, dtype=torch.bool)
        is_destination[(ys * width + xs).flatten()] = True
        sources.append(torch.nonzero(~is_destination).flatten())
        targets.append(torch.nonzero(is_destination).flatten())
    return torch.stack(sources).to(device), torch.stack(targets).to(device)


class Merge:
    """One bipartite matching of (B, N, C) tokens: :meth:`merge` gives (B, N - r, C) tokens,
    :meth:`unmerge` spreads (B, N - r, C) outputs back to (B, N, C)."""

    def __init__(self, tokens: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, count: int) -> None:
        self.src, self.dst, self.total = src, dst, int(tokens.shape[1])
        self.count = min(count, int(src.shape[1]))
        metric = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = _take(metric, src), _take(metric, dst)
        best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)  # each source's closest destination
        ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices
        self.merged, self.kept = ranked[:, : self.count], ranked[:, self.count :]
        self.target = partner.gather(1, self.merged)  # the destination each merged source joins

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        src, dst = _take(x, self.src), _take(x, self.dst)
        moving = _take(src, self.merged)
        index = self.target.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        dst = dst.scatter_reduce(1, index, moving, reduce="mean", include_self=True)
        return torch.cat([_take(src, self.kept), dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        kept_count = self.src.shape[1] - self.count
        kept, dst = y[:, :kept_count], y[:, kept_count:]
        out = y.new_empty(y.shape[0], self.total, y.shape[-1])
        _put(out, self.dst, dst)
        _put(out, self.src.gather(1, self.kept), kept)
        _put(out, self.src.gather(1, self.merged), _take(dst, self.target))
        return out


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _put(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    out.scatter_(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), values)


class TokenMerger:
    """Token merging on ``targets`` (:func:`merge_targets`) for one request: :meth:`attach` adds the
    hooks, :meth:`detach` removes every one of them."""

    def __init__(self, ratio: float, context: RunContext, targets: list[tuple[Any, list[Any]]]) -> None:
        self.ratio, self.context, self.targets = ratio, context, targets
        self.step = 0  # the denoiser call's step index (set by wrap_denoiser)
        self._grid: dict[int, tuple[int, int]] = {}  # id(transformer) -> its latest (height, width)
        self._partitions: dict[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[int, list[Merge | None]] = {}
        self._handles: list[Any] = []

    def attach(self) -> None:
        for transformer, attentions in self.targets:
            self._handles.append(transformer.register_forward_pre_hook(self._size_of, with_kwargs=True))
            for attention in attentions:
                before, after = self._around(transformer)
                self._handles.append(attention.register_forward_pre_hook(before, with_kwargs=True))
                self._handles.append(attention.register_forward_hook(after))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grid.clear()
        self._partitions.clear()
        self._pending.clear()

    def start_step(self, index: int) -> None:
        self.step = index
        self._partitions.clear()

    def _size_of(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 4:
            self._grid[id(module)] = (int(hidden.shape[-2]), int(hidden.shape[-1]))

    def _around(self, transformer: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
        def before(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            merge = self._matching(transformer, args[0] if args else kwargs.get("hidden_states"))
            self._pending.setdefault(id(module), []).append(merge)
            if merge is None:
                return None
            if args:
                return (merge.merge(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": merge.merge(kwargs["hidden_states"])}

        def after(module: Any, _args: Any, output: Any) -> Any:
            stack = self._pending.get(id(module))
            merge = stack.pop() if stack else None
            if merge is None or not isinstance(output, torch.Tensor):
                return None
            return merge.unmerge(output)

        return before, after

    def _matching(self, transformer: Any, hidden: Any) -> Merge | None:
        grid = self._grid.get(id(transformer))
        if grid is None or not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            return None
        height, width = grid
        batch, total = int(hidden.shape[0]), int(hidden.shape[1])
        count = int(total * self.ratio)
        if total != height * width or height < 2 or width < 2 or count <= 0:
            return None
        key = (height, width, batch, str(hidden.device))
        if key not in self._partitions:
            self._partitions[key] = partition(height, width, self._row_seeds(batch), hidden.device)
        return Merge(hidden, *self._partitions[key], count)

    def _row_seeds(self, batch: int) -> list[int]:
        """One seed per row of the UNet's batch, from the image it belongs to (the batch is the
        images, or ``[unconditional; conditional]`` with classifier-free guidance) and the step."""
        seeds = list(self.context.seeds) or [self.context.request.seed]
        rows = seeds * (batch // len(seeds)) if batch % len(seeds) == 0 else [seeds[0]] * batch
        return [seed * 1_000_003 + self.step * 7_919 + 1 for seed in rows]


@hookimpl
def patch_model(request: GenerationRequest, context: RunContext, patches: ModelPatches) -> None:
    ratio = merging_ratio(request)
    if ratio <= 0:
        return
    targets = merge_targets(context.bundle.unet)
    if not targets:
        raise InvalidRequestError(
            f"{FIELD}: the model {context.bundle.name!r} has no self-attention blocks to merge tokens in; "
            "set it to 0"
        )
    merger = TokenMerger(ratio, context, targets)
    context.state[STATE] = merger
    patches.add("token merging", merger.attach, merger.detach)


@hookimpl
def wrap_denoiser(request: GenerationRequest, context: RunContext) -> Any:
    merger = context.state.get(STATE)
    if merger is None:
        return None

    def wrap(call: Callable[[torch.Tensor, DenoiseStep], torch.Tensor]) -> Any:
        def merged(model_input: torch.Tensor, step: DenoiseStep) -> torch.Tensor:
            merger.start_step(step.index)
            return call(model_input, step)

        return merged

    return wrap
