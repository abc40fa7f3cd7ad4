"""Exact bfloat16 attention on CPUs with AVX-512 BF16, about twice as fast as PyTorch's.

A bfloat16 UNet on the CPU spends a third of each step in attention (docs/benchmarks.md), and
PyTorch's flash-attention kernel reaches only about 30 % of what the same CPU gives in a bfloat16
matrix product: at the head sizes of SD-style UNets (40 to 160) the softmax costs as much as the
two products. ``csrc/cpu_attention.cpp`` is a flash attention of our own for that case: both
products on the ``vdpbf16ps`` instruction from packed operands, the exponentials as a polynomial
(see the source's header). It computes the same result as ``F.scaled_dot_product_attention`` in
bfloat16, to bfloat16 rounding (the tests compare both with float32 attention).

It runs inside :mod:`webui.engine.cpu_kernels`' mode (``--no-cpu-kernels`` turns it off with the
rest) for ``F.scaled_dot_product_attention`` calls on bfloat16 CPU tensors without a mask, dropout
or causal masking, with at least :data:`MIN_QUERIES` queries (below that it measured no reliable
gain). The library is compiled on first use with the system's C++ compiler (``$CXX``, else
``g++`` or ``c++``; 1-2 s) into the cache folder (``cpu-kernels/`` in
:func:`webui.paths.cache_dir`) and checked against PyTorch on a probe. Where the CPU lacks the
instructions, no compiler is found, compiling fails or the probe disagrees, attention stays with
PyTorch, with one warning that says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from webui import paths

__all__ = ["MAX_DIM", "MIN_QUERIES", "attention", "available", "cpu_supported", "takes"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
CACHE_SUBDIR = "cpu-kernels"
FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-mfma",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
)
# what the compiled code executes (names as /proc/cpuinfo spells them)
CPU_FLAGS = frozenset({"fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
COMPILE_TIMEOUT_S = 300
# calls with fewer queries stay with PyTorch: at 256 queries (SD 1.5's 16x16 level) and below the
# kernel measured slower in one run and faster in another (thread start-up and packing weigh more
# in small calls): no reliable gain (docs/benchmarks.md)
MIN_QUERIES = 512
# query rows per task and keys per block (measured flat between 16-128 rows and 128-512 keys)
QUERY_BLOCK = 64
KEY_BLOCK = 256
MAX_DIM = 1024  # the largest head size the kernel takes (the VAE's is 512)

_I64x3 = ctypes.c_int64 * 3


def cpu_supported() -> bool:
    """Whether this is a Linux x86-64 CPU with the AVX-512 BF16 instructions the kernel uses."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return CPU_FLAGS <= set(line.partition(":")[2].split())
    except OSError:
        return False
    return False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _build(compiler: str) -> Path:
    """The compiled library in the cache folder, compiling it unless a build of this source with
    this compiler and these flags is there. Raises OSError or CalledProcessError (with the
    compiler's messages) or TimeoutExpired."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), *map(str.encode, FLAGS)]))
    folder = paths.cache_dir() / CACHE_SUBDIR
    target = folder / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log.info("compiling the bfloat16 CPU attention kernel into %s (once)", target)
    # compiled to a temporary name and renamed: another process building at the same time, or a
    # build stopped halfway, never leaves a half-written library under the final name
    handle, temporary = tempfile.mkstemp(prefix=".cpu_attention-", suffix=".so", dir=folder)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=True,
        )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _load(path: Path) -> Any:
    library = ctypes.CDLL(str(path))
    pointer = ctypes.c_void_p
    i64 = ctypes.c_int64
    library.ls_attention_workspace.restype = i64
    library.ls_attention_workspace.argtypes = [i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    library.ls_attention_bf16.restype = ctypes.c_int
    library.ls_attention_bf16.argtypes = [
        *(pointer,) * 4,
        *(i64,) * 5,
        *(ctypes.POINTER(i64),) * 4,
        ctypes.c_float,
        ctypes.c_int,
        i64,
        i64,
        pointer,
    ]
    return library


def _probe(library: Any) -> bool:
    """Whether the kernel agrees with float32 attention as closely as PyTorch's own bfloat16
    kernel does, on a shape with ragged query and key counts and an odd head size."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, n, 3, 37, generator=generator).to(torch.bfloat16).transpose(1, 2)
        for n in (MIN_QUERIES + 9, 83, 83)
    )
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    theirs = (F.scaled_dot_product_attention(q, k, v).float() - expected).abs().max().item()
    ours = (_run(library, q, k, v, None).float() - expected).abs().max().item()
    return ours <= 2 * theirs + 1e-3


@functools.cache
def _library() -> Any:
    """The loaded and checked library, or None (with one warning) where it cannot run here."""
    if not cpu_supported():
        log.info("bfloat16 CPU attention kernel off: the CPU has no AVX-512 BF16 instructions")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("bfloat16 CPU attention kernel off: no C++ compiler found (set CXX, or install g++)")
        return None
    try:
        library = _load(_build(compiler))
        ok = _probe(library)
    except subprocess.CalledProcessError as error:
        first = (error.stderr or "").strip().splitlines()
        log.warning(
            "bfloat16 CPU attention kernel off: compiling it failed (%s)", first[0] if first else error
        )
        return None
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        log.warning("bfloat16 CPU attention kernel off: %s", error)
        return None
    if not ok:
        log.warning("bfloat16 CPU attention kernel off: it disagrees with PyTorch's attention on a probe")
        return None
    return library


def available() -> bool:
    """Whether the kernel runs here (compiled, loaded and checked once per process)."""
    return _library() is not None


def takes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an ``F.scaled_dot_product_attention(*args, **kwargs)`` call is one the kernel
    computes: bfloat16 CPU tensors ``[batch, heads, rows, dim]`` of the same batch and heads,
    without gradients, mask, dropout, causal masking or grouped-query heads, the values' dim the
    queries', contiguous in the last dim, with at least :data:`MIN_QUERIES` queries and a positive
    scale (or the default)."""
    if len(args) != 3 or not kwargs.keys() <= {"attn_mask", "dropout_p", "is_causal", "scale"}:
        return False
    q, k, v = args
    if not all(type(t) is torch.Tensor for t in (q, k, v)):
        return False
    if (
        kwargs.get("attn_mask") is not None
        or kwargs.get("dropout_p", 0.0) != 0.0
        or kwargs.get("is_causal", False)
    ):
        return False
    scale = kwargs.get("scale")
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        return False  # the kernel's running maximum assumes a positive scale
    return (
        q.dim() == k.dim() == v.dim() == 4
        and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 for t in (q, k, v))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2] > 0
        and q.shape[3] == k.shape[3] == v.shape[3]
        and q.shape[2] >= MIN_QUERIES
        and q.shape[3] <= MAX_DIM
        and available()
    )


def _run(
    library: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    threads = max(1, torch.get_num_threads())
    size = library.ls_attention_workspace(batch, heads, queries, keys, dim, QUERY_BLOCK, KEY_BLOCK, threads)
    if size < 0:
        raise ValueError(
            f"attention shape {tuple(q.shape)} x {tuple(k.shape)} is beyond the CPU kernel's limits"
        )
    workspace = torch.empty(size, dtype=torch.uint8)
    # laid out [batch, rows, heads, dim], the order the attention processor reshapes it to next
    out = torch.empty(batch, queries, heads, dim, dtype=torch.bfloat16).transpose(1, 2)

    def strides(t: torch.Tensor) -> Any:
        return _I64x3(*t.stride()[:3])

    code = library.ls_attention_bf16(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        queries,
        keys,
        dim,
        strides(q),
        strides(k),
        strides(v),
        strides(out),
        dim**-0.5 if scale is None else float(scale),
        threads,
        QUERY_BLOCK,
        KEY_BLOCK,
        workspace.data_ptr(),
    )
    if code != 0:
        raise ValueError(
            f"attention shape {tuple(q.shape)} x {tuple(k.shape)} is beyond the CPU kernel's limits"
        )
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` through the kernel, for a call
    :func:`takes` accepts."""
    library = _library()
    if library is None:
        raise RuntimeError("the bfloat16 CPU attention kernel is not available here")
    return _run(library, q, k, v, scale)
