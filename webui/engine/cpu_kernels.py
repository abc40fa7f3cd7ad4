"""Faster exact kernels for models on the CPU, on by default for SD-size UNets
(``--no-cpu-kernels`` turns them off): float32 linear layers, GEGLU and small convolutions (below),
and bfloat16 attention (:mod:`webui.engine.cpu_attention`, a kernel of our own for CPUs with AVX-512
BF16).

PyTorch runs a float32 ``Linear`` layer on the CPU through MKL's GEMM and a convolution through
oneDNN. On the CPU measured (an AVX-512 one, docs/benchmarks.md) three of the UNet's operations run
well below what the same hardware gives through another route:

- **linear layers** (attention projections, feed-forward): oneDNN's matrix product
  (``torch.ops.mkldnn._linear_pointwise``, the kernel TorchInductor uses) instead of MKL's, for
  inputs of at least :data:`LINEAR_MIN_ROWS` rows;
- **the GEGLU feed-forward** of SD-style transformer blocks: its two halves as two oneDNN products,
  the GELU fused into the first and the product of the halves into the second, so the 2x-wide
  intermediate, its GELU and the multiplication never make a pass over memory of their own;
- **3x3 convolutions on small feature maps** (the UNet's deepest level, at most
  :data:`IM2COL_MAX_PIXELS` output pixels in the batch) with channels-last weights
  (``--channels-last``): one GEMM over the nine shifted copies of the input (im2col) instead of
  oneDNN's direct convolution, which is slow at these sizes.

Each computes the same sums as the layer it replaces, in another order: outputs agree to float32
rounding (relative differences around 1e-6; the pipeline-level parity tests hold at their
tolerance), so, unlike the opt-in approximations (token merging, DeepCache), nothing is recorded
in the image's metadata. Nothing is cached or copied: weights are read where they are at every
call, so LoRA patches and weights changed in place are honoured, and peak memory does not grow.
bfloat16 models run PyTorch's own kernels for these three: their linear layers are oneDNN's
already, and the GEGLU and im2col routes, faster alone, measured no faster in a whole UNet call
while raising its peak memory by 0.1 GB. Their attention is where bfloat16 gains (about twice as
fast: docs/benchmarks.md); with it, bfloat16 UNets run channels-last (oneDNN's bfloat16
convolutions prefer it) and, in every dtype, the identical halves of a CFG batch are computed once
up to the first cross-attention (:mod:`webui.engine.cfg_halves`).

The kernels apply inside :func:`applied` only: a :class:`~torch.overrides.TorchFunctionMode`
that sees ``F.linear``, ``F.conv2d`` and ``F.scaled_dot_product_attention`` calls on the thread
that runs the batch (other threads and other requests are untouched), plus the GEGLU modules'
``forward`` set on the instance for the block and removed afterwards. Only the calls each kernel is
made for are taken (float32 CPU tensors without gradients for the first three, bfloat16 ones for
attention); anything else (another dtype or device, a strided convolution, a masked attention,
training) goes to PyTorch unchanged. If the oneDNN operations are missing from the PyTorch build,
or give a different result on a probe the first time (:func:`available`), the float32 kernels stay
off with one warning; the attention kernel has its own checks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from webui.engine import cfg_halves, cpu_attention
from webui.engine.memory import to_channels_last

__all__ = [
    "IM2COL_MAX_PIXELS",
    "LINEAR_MIN_ROWS",
    "MIN_UNET_PARAMS",
    "CpuKernels",
    "applied",
    "channels_last_for_bfloat16",
    "available",
    "worth_it",
]

log = logging.getLogger(__name__)

# linear layers with fewer rows are left to PyTorch: the kernels are for the UNet's spatial tokens
# (4,096 / 1,024 / 256 per image at 512x512); the text encoder's 77 tokens and cross-attention's keys
# gain little (oneDNN 197 against MKL's 181 GFLOPS at 154 rows, measured)
LINEAR_MIN_ROWS = 512
# a 3x3 convolution with at most this many output pixels (batch x height x width) runs as one
# GEMM; at 8x8 latents (SD 1.5's deepest level at 512x512, batch 2: 128) it measured 2x faster than
# oneDNN's direct convolution, at 16x16 0.84-1.04x (docs/benchmarks.md)
IM2COL_MAX_PIXELS = 256
# and at least this many input channels (SD's deepest level has 1,280 or more; narrower ones are
# not measured)
IM2COL_MIN_CHANNELS = 256
# models whose UNet has fewer parameters run without the kernels: their layers are too small to
# gain, and the mode's Python call per operation costs more than it saves (the shipped 5 M
# parameter model measured 0.59 s per image without, 0.71 s with them)
MIN_UNET_PARAMS = 100_000_000


def _linear_op() -> Any:
    return torch.ops.mkldnn._linear_pointwise


@functools.cache
def available() -> bool:
    """Whether this PyTorch build runs oneDNN's float32 linear operations and they agree with
    PyTorch's own on a probe (checked once per process)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8, 16, generator=generator)
        w = torch.randn(12, 16, generator=generator)
        b = torch.randn(12, generator=generator)
        op = _linear_op()
        plain = op(x, w, b, "none", [], "")
        gelu = op(x, w, b, "gelu", [], "none")
        product = op.binary(x, gelu, w, b, "mul")
        expected = F.linear(x, w, b)
        ok = (
            torch.allclose(plain, expected, atol=1e-4)
            and torch.allclose(gelu, F.gelu(expected), atol=1e-4)
            and torch.allclose(product, expected * F.gelu(expected), atol=2e-3)
        )
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        log.warning("faster CPU kernels off: oneDNN's linear operations are not usable here (%s)", error)
        return False
    if not ok:
        log.warning("faster CPU kernels off: oneDNN's linear operations disagree with F.linear on a probe")
    return ok


def worth_it(unet: Any) -> bool:
    """Whether ``unet`` is big enough (:data:`MIN_UNET_PARAMS`) for the kernels to pay."""
    if not isinstance(unet, torch.nn.Module):
        return False
    return sum(p.numel() for p in unet.parameters()) >= MIN_UNET_PARAMS


def _takes(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` through oneDNN's matrix product."""
    rows = x.reshape(-1, x.shape[-1])
    out = _linear_op()(rows, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def conv3x3_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution (stride 1, padding 1) as one GEMM: the padded input's nine shifted views
    side by side on the channel axis (channels last), times the weight laid out (out, ky, kx, in).
    Returned in channels-last layout."""
    n, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    columns = torch.cat([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], dim=3)
    kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c)
    out = _linear_op()(columns.view(n * h * w, 9 * c), kernel, bias, "none", [], "")
    return out.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)


def geglu(module: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` (``h * gelu(g)`` with ``h, g`` the halves of ``proj(x)``) as two
    oneDNN products: ``gelu(x W_g + b_g)``, then ``(x W_h + b_h) * that``, the activation and the
    product fused into them."""
    proj = module.proj
    half = proj.weight.shape[0] // 2
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    bias = proj.bias
    op = _linear_op()
    gate = op(rows, proj.weight[half:], None if bias is None else bias[half:], "gelu", [], "none")
    out = op.binary(rows, gate, proj.weight[:half], None if bias is None else bias[:half], "mul")
    return out.view(*hidden_states.shape[:-1], half)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _is_one(value: Any) -> bool:
    return value == 1 or value == (1, 1) or value == [1, 1]


class CpuKernels(TorchFunctionMode):
    """While active (on this thread): ``F.linear`` and small 3x3 ``F.conv2d`` calls on float32 CPU
    tensors run through the kernels above, and bfloat16 ``F.scaled_dot_product_attention`` calls
    through :func:`webui.engine.cpu_attention.attention`; every other call is passed on unchanged.
    ``counts`` says how many calls each kernel took (for tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"linear": 0, "im2col": 0, "geglu": 0, "attention": 0, "cfg_halves": 0}

    def geglu_forward(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """A ``forward`` for the GEGLU ``module``: :func:`geglu` for float32 CPU input without
        gradients, the class's own ``forward`` for anything else."""
        original = types.MethodType(type(module).forward, module)
        proj: Any = module.proj

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if (
                args
                or kwargs
                or not _takes(hidden_states)
                or hidden_states.shape[-1] != proj.in_features
                or not _plain(proj.weight, proj.bias, hidden_states.dtype)
                or not proj.weight.is_contiguous()
            ):
                return original(hidden_states, *args, **kwargs)
            self.counts["geglu"] += 1
            return geglu(module, hidden_states)

        return forward

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if cpu_attention.takes(args, kwargs):
                self.counts["attention"] += 1
                q, k, v = args
                return cpu_attention.attention(q, k, v, scale=kwargs.get("scale"))
            return func(*args, **kwargs)
        if (func is F.linear or func is F.conv2d) and available():
            x, weight = args[0], args[1]
            bias = _argument(args, kwargs, 2, "bias", None)
            if func is F.linear and _linear_takes(x, weight, bias):
                self.counts["linear"] += 1
                return linear(x, weight, bias)
            if func is F.conv2d and _im2col_takes(x, weight, bias, args, kwargs):
                self.counts["im2col"] += 1
                return conv3x3_im2col(x, weight, bias)
        return func(*args, **kwargs)


def _linear_takes(x: Any, weight: Any, bias: Any) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and _takes(x)
        and x.dim() >= 2
        and x.numel() >= LINEAR_MIN_ROWS * x.shape[-1] > 0
        and _plain(weight, bias, x.dtype)
        and weight.dim() == 2
        and weight.is_contiguous()
    )


def _im2col_takes(x: Any, weight: Any, bias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and _takes(x)
        and x.dim() == 4
        and _plain(weight, bias, x.dtype)
        and tuple(weight.shape[1:]) == (x.shape[1], 3, 3)
        # the GEMM reads the weight as (out, ky, kx, in): free with channels-last weights; laying
        # out plain ones at every call measured 1.1-1.2x slower than oneDNN's own convolution
        and weight.is_contiguous(memory_format=torch.channels_last)
        and weight.shape[1] >= IM2COL_MIN_CHANNELS
        and x.shape[0] * x.shape[2] * x.shape[3] <= IM2COL_MAX_PIXELS
        and _is_one(_argument(args, kwargs, 3, "stride", 1))
        and _is_one(_argument(args, kwargs, 4, "padding", 0))
        and _is_one(_argument(args, kwargs, 5, "dilation", 1))
        and _argument(args, kwargs, 6, "groups", 1) == 1
    )


def _plain(weight: Any, bias: Any, dtype: torch.dtype) -> bool:
    """CPU weights (and bias) of ``dtype`` that are plain tensors, not a subclass with its own
    dispatch."""
    tensors = [weight] if bias is None else [weight, bias]
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == dtype
        for t in tensors
    )


def _geglu_modules(modules: Iterable[torch.nn.Module]) -> list[Any]:
    from diffusers.models.activations import GEGLU

    found: list[Any] = []
    for root in modules:
        for module in root.modules():
            if (
                type(module) is GEGLU
                and type(module.proj) is torch.nn.Linear
                and "forward" not in module.__dict__
            ):
                found.append(module)
    return found


def channels_last_for_bfloat16(modules: Iterable[torch.nn.Module]) -> None:
    """bfloat16 CPU modules' 4-D weights in channels-last layout, kept afterwards (converting back
    and forth would copy the weights at every request; the layout changes no result). oneDNN's
    bfloat16 convolutions run faster on it: a whole SD 1.5 UNet call with the kernels measured
    0.93x (docs/benchmarks.md); in float32 the layout measured slower, so those are left alone."""
    to_channels_last(
        module
        for module in modules
        if (first := next(module.parameters(), None)) is not None
        and first.device.type == "cpu"
        and first.dtype == torch.bfloat16
    )


@contextlib.contextmanager
def applied(modules: Iterable[torch.nn.Module]) -> Iterator[CpuKernels]:
    """The kernels for the ``with`` block on this thread, with the GEGLU blocks of ``modules``
    (the UNet, ControlNets) fused and the identical halves of a CFG batch computed once before the
    first cross-attention (:mod:`webui.engine.cfg_halves`), both undone afterwards, also after an
    error; bfloat16 modules are put in channels-last layout and kept so
    (:func:`channels_last_for_bfloat16`). Yields the mode. Each route checks on its first call whether it runs here
    (:func:`available`, :func:`webui.engine.cpu_attention.available`) and passes calls on to
    PyTorch if not."""
    modules = list(modules)
    channels_last_for_bfloat16(modules)
    mode = CpuKernels()
    patched = _geglu_modules(modules) if available() else []
    for module in patched:
        module.forward = mode.geglu_forward(module)  # type: ignore[method-assign]
    try:
        with mode, cfg_halves.shared(modules, mode.counts):
            yield mode
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
