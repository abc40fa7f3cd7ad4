"""Each faster CPU kernel (``webui.engine.cpu_kernels``, ``webui.engine.cpu_attention``) against
PyTorch's own route, on the shapes of SD 1.5's UNet at 512x512 with CFG (batch 2), alternating in
one process: the float32 routes (linear, GEGLU, im2col), also in bfloat16 where the engine does not
use the GEGLU and im2col ones (no faster in a whole UNet call, 0.1 GB more peak memory) and the
figures show why, and the bfloat16 attention kernel.

    python benchmarks/bench_cpu_kernels.py                  # the SD 1.5 shapes, both dtypes
    python benchmarks/bench_cpu_kernels.py --unet 4         # and 4 whole float32 UNet calls each way
    python benchmarks/bench_cpu_kernels.py --unet 4 --unet-dtype bfloat16
    python benchmarks/bench_cpu_kernels.py --quick          # small shapes, a check that it runs

Prints per shape the median of ``--repeats`` calls each way, their ratio, and the largest
difference between the two outputs relative to the largest output value. ``--unet N`` then times
whole calls of SD 1.5's UNet (random weights, 512x512, batch 2 = one CFG step) with and without the
kernels, alternating, N each, on one CFG step (the latents twice, two texts; ``--quick``: a
scaled-down UNet; ``--channels-last``: its weights channels-last, which the im2col route needs; a
bf16 UNet is channels-last on both sides, as the kernels keep it, and each side's difference from
the float32 UNet is printed too). The whole pipeline is
``bench_vs_diffusers.py --setups ours-plain,ours``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_vs_diffusers import _randomised, family_config  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.activations import GEGLU  # noqa: E402

from webui.engine import cpu_attention, cpu_kernels  # noqa: E402

# (rows, in, out) of SD 1.5's linear layers at 64x64, 32x32, 16x16 latents, batch 2
LINEARS = [(8192, 320, 320), (8192, 1280, 320), (2048, 640, 640), (512, 1280, 1280)]
# (rows, in, half of out) of its GEGLU projections
GEGLUS = [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120)]
# (in channels, out channels, side) of its 3x3 convolutions at 8x8 latents
CONVS = [(1280, 1280, 8), (2560, 1280, 8)]
# (batch, heads, queries, keys, head size) of attention calls: SD 1.5 at 512x512 with CFG (64x64, 32x32
# and 16x16 latents, self and cross), SDXL's head size at 1024x1024, the VAE's single head (one image)
ATTENTIONS = [
    (2, 8, 4096, 4096, 40),
    (2, 8, 4096, 77, 40),
    (2, 8, 1024, 1024, 80),
    (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160),  # below cpu_attention.MIN_QUERIES: left to PyTorch, here to show why
    (2, 10, 4096, 4096, 64),
    (2, 20, 1024, 1024, 64),
    (1, 1, 4096, 4096, 512),
]
QUICK = {
    "linears": [(512, 64, 64)],
    "geglus": [(512, 64, 128)],
    "convs": [(256, 64, 8)],
    "attentions": [(2, 2, 512, 100, 40)],
}


def seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def cases(dtype: torch.dtype, shapes: dict[str, list[tuple[int, int, int]]]) -> list[tuple[str, Any, Any]]:
    """(label, PyTorch's call, the kernel's call) for each shape the kernels take in ``dtype``."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    found = []
    if dtype == torch.float32:  # bfloat16 linear layers are oneDNN's already
        for rows, fan_in, fan_out in shapes["linears"]:
            x, w, b = rand(rows, fan_in), rand(fan_out, fan_in, scale=fan_in**-0.5), rand(fan_out)
            found.append(
                (
                    f"linear {rows}x{fan_in} -> {fan_out}",
                    lambda x=x, w=w, b=b: F.linear(x, w, b),
                    lambda x=x, w=w, b=b: cpu_kernels.linear(x, w, b),
                )
            )
    for rows, fan_in, half in shapes["geglus"]:
        module = GEGLU(fan_in, half).to(dtype)
        x = rand(2, rows // 2, fan_in)
        found.append(
            (
                f"GEGLU {rows}x{fan_in} -> {half}",
                lambda m=module, x=x: type(m).forward(m, x),
                lambda m=module, x=x: cpu_kernels.geglu(m, x),
            )
        )
    for fan_in, fan_out, side in shapes["convs"]:
        x = rand(2, fan_in, side, side).contiguous(memory_format=torch.channels_last)
        w = rand(fan_out, fan_in, 3, 3, scale=(9 * fan_in) ** -0.5).contiguous(
            memory_format=torch.channels_last
        )
        b = rand(fan_out)
        found.append(
            (
                f"conv 3x3 {fan_in} -> {fan_out} at {side}x{side}",
                lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1),
                lambda x=x, w=w, b=b: cpu_kernels.conv3x3_im2col(x, w, b),
            )
        )
    if dtype == torch.bfloat16:  # the attention kernel is bfloat16 only
        for batch, heads, queries, keys, dim in shapes["attentions"]:
            q, k, v = (rand(batch, n, heads, dim).transpose(1, 2) for n in (queries, keys, keys))
            found.append(
                (
                    f"attention {heads}x{queries}x{keys}, head {dim}"
                    + (f", batch {batch}" if batch != 2 else ""),
                    lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                    lambda q=q, k=k, v=v: cpu_attention.attention(q, k, v),
                )
            )
    return found


def unet_calls(
    calls: int, quick: bool, channels_last: bool, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Median seconds of whole UNet calls without and with the kernels, alternating, on one CFG
    step (the latents twice, two texts). In bfloat16 also each one's difference from float32."""
    config = {k: v for k, v in family_config("sd15", quick)["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = _randomised(unet, 0)
    # as --channels-last (the im2col route needs channels-last weights); a bf16 UNet the kernels
    # keep channels-last, so both sides run it so
    if channels_last or dtype == torch.bfloat16:
        unet.to(memory_format=torch.channels_last)
    side = 8 if quick else 64
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, side, side, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500.0, 500.0])
    reference = None
    if dtype != torch.float32:
        with torch.no_grad():
            reference = unet(latents, timestep, text).sample
        unet.to(dtype)
        latents, text = latents.to(dtype), text.to(dtype)
    plain_s, kernel_s = [], []
    counts: dict[str, int] = {}
    with torch.no_grad():
        for _ in range(calls):
            started = time.perf_counter()
            plain = unet(latents, timestep, text).sample
            plain_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            with cpu_kernels.applied([unet]) as mode:
                fast = unet(latents, timestep, text).sample
            kernel_s.append(time.perf_counter() - started)
            counts = dict(mode.counts)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    return {
        "dtype": str(dtype).removeprefix("torch."),
        "pytorch_s": statistics.median(plain_s),
        "kernel_s": statistics.median(kernel_s),
        "difference": relative(fast, plain),
        "float32_difference": None
        if reference is None
        else (relative(plain, reference), relative(fast, reference)),
        "counts": counts,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a check that it runs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--unet", type=int, default=0, metavar="N", help="also N whole UNet calls each way")
    parser.add_argument(
        "--channels-last", action="store_true", help="the UNet's weights channels-last (--channels-last)"
    )
    parser.add_argument("--unet-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit("oneDNN's linear operations are not usable in this PyTorch build")
    shapes = (
        QUICK
        if args.quick
        else {"linears": LINEARS, "geglus": GEGLUS, "convs": CONVS, "attentions": ATTENTIONS}
    )
    if not cpu_attention.available():
        print("(the bfloat16 attention kernel does not run here: no AVX-512 BF16 or no C++ compiler)")
        shapes = {**shapes, "attentions": []}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | operation | PyTorch ms | kernel ms | kernel / PyTorch | relative difference |")
    print("|---|---|---|---|---|---|")
    rows = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            for label, theirs, ours in cases(dtype, shapes):
                try:
                    reference, own = theirs().float(), ours().float()
                except RuntimeError as error:  # oneDNN's bf16 needs AVX-512 or AVX-NE-CONVERT
                    print(f"| {name} | (not available on this CPU: {str(error)[:80]}) | | | | |")
                    break
                difference = float((own - reference).abs().max() / reference.abs().max())
                # alternate the two, so a change in the machine's speed hits both alike
                pytorch_s, kernel_s = [], []
                for _ in range(args.repeats):
                    pytorch_s.append(seconds(theirs))
                    kernel_s.append(seconds(ours))
                row = {
                    "dtype": name,
                    "operation": label,
                    "pytorch_ms": 1000 * statistics.median(pytorch_s),
                    "kernel_ms": 1000 * statistics.median(kernel_s),
                    "difference": difference,
                }
                rows.append(row)
                print(
                    f"| {name} | {label} | {row['pytorch_ms']:.2f} | {row['kernel_ms']:.2f} | "
                    f"{row['kernel_ms'] / row['pytorch_ms']:.2f} | {difference:.1e} |",
                    flush=True,
                )
        if args.unet:
            print()
            print(
                "| dtype | UNet call, PyTorch s | with the kernels s | ratio | relative difference "
                "| each from float32 (PyTorch / kernels) | calls taken |"
            )
            print("|---|---|---|---|---|---|---|")
            row = unet_calls(args.unet, args.quick, args.channels_last, getattr(torch, args.unet_dtype))
            row["operation"] = "UNet call"
            rows.append(row)
            taken = ", ".join(f"{name} {count}" for name, count in row["counts"].items())
            from_float32 = row["float32_difference"]
            each = "—" if from_float32 is None else f"{from_float32[0]:.1e} / {from_float32[1]:.1e}"
            print(
                f"| {row['dtype']} | {row['pytorch_s']:.3f} | {row['kernel_s']:.3f} | "
                f"{row['kernel_s'] / row['pytorch_s']:.2f} | {row['difference']:.1e} | {each} | {taken} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
