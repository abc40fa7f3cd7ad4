"""The opt-in approximations measured: token merging (``token_merging_ratio``) and DeepCache
(``deep_cache_interval``), each value against the exact image of the same request.

For each model, one exact run and then one run per setting, each repeated (``--repeats``, the
median counts), all in this process on the same engine: seconds per image, the speed-up over the
exact run, and the PSNR of the decoded image against the exact one (in dB over pixels in [0, 1];
higher is closer, identical images are ``inf``). Printed as one Markdown table per model.

Models: ``shapes``, the shipped default model (``models/latent-studio-shapes``, 64x64), and
``sd15``, the SD 1.5 architecture with random weights (built as ``bench_vs_diffusers.py`` builds it,
no download; 512x512). Random weights give noise-like images, so their PSNR says how far the
approximation moves the UNet's output, not how a real picture looks; the speed-up is the real one.

    python benchmarks/bench_approximations.py                       # shapes 64 px and SD 1.5 512 px, 20 steps
    python benchmarks/bench_approximations.py --models sd15 --device cuda
    python benchmarks/bench_approximations.py --tiny                # scaled-down SD 1.5 at 64 px: seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webui.engine.memory import auto_dtype  # noqa: E402
from webui.engine.pipeline import Engine  # noqa: E402
from webui.plugins import make_plugin_manager  # noqa: E402
from webui.request import GenerationRequest  # noqa: E402

# (label, request extra): the exact run first
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("exact", {}),
    ("token merging 0.3", {"token_merging_ratio": 0.3}),
    ("token merging 0.5", {"token_merging_ratio": 0.5}),
    ("token merging 0.7", {"token_merging_ratio": 0.7}),
    ("DeepCache 2", {"deep_cache_interval": 2}),
    ("DeepCache 3", {"deep_cache_interval": 3}),
    ("DeepCache 5", {"deep_cache_interval": 5}),
    ("token merging 0.5 + DeepCache 3", {"token_merging_ratio": 0.5, "deep_cache_interval": 3}),
]
PROMPTS = {
    "shapes": "a large red circle at the top left on a blue background",
    "sd15": "a lighthouse on a cliff at dusk, oil painting",
}
MODELS = ("shapes", "sd15")


def load_vs_diffusers() -> Any:
    """The side-by-side benchmark's module, for its random-weight SD 1.5 builder."""
    path = ROOT / "benchmarks" / "bench_vs_diffusers.py"
    spec = importlib.util.spec_from_file_location("bench_vs_diffusers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def psnr(exact: torch.Tensor, other: torch.Tensor) -> float:
    mse = float(((exact.double() - other.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def timed(engine: Engine, request: GenerationRequest, bundle: Any, device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = engine.generate(request, bundle=bundle)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    plugins = make_plugin_manager(entry_points=False, plugin_dirs=[])
    if name == "shapes":
        engine = Engine(plugins=plugins, models_dir=str(ROOT / "models"), device=device, dtype="auto")
        bundle = engine.models.get(None)
        size = args.size or bundle.default_size
    else:
        print(f"## {name}: building random weights...", file=sys.stderr, flush=True)
        vs = load_vs_diffusers()
        components = vs.build("sd15", args.tiny)
        params = sum(p.numel() for p in components["unet"].parameters())
        dtype = auto_dtype(device, params)
        engine = Engine(plugins=plugins, device=device, dtype=dtype)
        bundle = vs.our_bundle("sd15", components).to(device, dtype)
        del components
        size = args.size or (64 if args.tiny else 512)
    unet_params = sum(p.numel() for p in bundle.unet.parameters())
    request = GenerationRequest(
        prompt=PROMPTS[name],
        negative_prompt="",
        steps=args.steps,
        seed=args.seed,
        width=size,
        height=size,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
    )
    print(f"## {name}: warming up...", file=sys.stderr, flush=True)
    timed(engine, request.replace(steps=2), bundle, device)
    rows: list[dict[str, Any]] = []
    exact_pixels: torch.Tensor | None = None
    for label, extra in [
        (label, extra) for label, extra in SETTINGS if label == "exact" or label in args.settings
    ]:
        print(f"## {name}: {label}...", file=sys.stderr, flush=True)
        seconds: list[float] = []
        result = None
        for _ in range(args.repeats):
            spent, result = timed(engine, request.replace(extra=dict(extra)), bundle, device)
            seconds.append(spent)
        assert result is not None
        image = result.images[0]
        if exact_pixels is None:
            exact_pixels = image.pixels
        rows.append(
            {
                "setting": label,
                "extra": extra,
                "s_per_image": statistics.median(seconds),
                "psnr_db": psnr(exact_pixels, image.pixels),
                "infotext": result.infotexts[0].splitlines()[-1],
            }
        )
    exact_seconds = rows[0]["s_per_image"]
    for row in rows:
        row["speedup"] = exact_seconds / row["s_per_image"]
    report = {
        "model": name if name == "shapes" else f"sd15{' (tiny)' if args.tiny else ''}",
        "model_name": bundle.name,
        "size": size,
        "steps": args.steps,
        "sampler": request.sampler,
        "cfg_scale": request.cfg_scale,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "unet_params": unet_params,
        "repeats": args.repeats,
        "rows": rows,
    }
    engine = bundle = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"### {report['model']} ({report['model_name']}), {report['size']}x{report['size']}, "
        f"{report['steps']} steps, {report['sampler']}, CFG {report['cfg_scale']:g}, {report['dtype']}, "
        f"UNet {report['unet_params'] / 1e6:.1f} M parameters, median of {report['repeats']}",
        "",
        "| setting | s/image | speed-up | PSNR vs exact (dB) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        db = "exact" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.1f}"
        lines.append(f"| {row['setting']} | {row['s_per_image']:.3f} | {row['speedup']:.2f}x | {db} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="shapes,sd15", help="comma-separated: shapes, sd15")
    parser.add_argument("--size", type=int, default=None, help="default: the model's (shapes 64, sd15 512)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (6 with --tiny)")
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per setting (default 3, 1 with --tiny)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--tiny", action="store_true", help="SD 1.5 scaled down to run in seconds, at 64 px")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--settings",
        default=",".join(label for label, _ in SETTINGS[1:]),
        help="comma-separated settings to run besides the exact one (default: all), e.g. "
        '"token merging 0.5,DeepCache 3"',
    )
    args = parser.parse_args(argv)
    args.settings = [part.strip() for part in args.settings.split(",") if part.strip()]
    unknown = [label for label in args.settings if label not in dict(SETTINGS)]
    if unknown:
        parser.error(
            f"unknown setting {unknown[0]!r}: choose from {', '.join(label for label, _ in SETTINGS)}"
        )
    if args.steps is None:
        args.steps = 6 if args.tiny else 20
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    for library in ("diffusers", "transformers"):
        __import__(f"{library}.utils.logging", fromlist=["set_verbosity_error"]).set_verbosity_error()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    header = f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}{gpu}"
    print(header)
    report: dict[str, Any] = {"machine": header, "results": []}
    for name in [part.strip() for part in args.models.split(",") if part.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: choose {', '.join(MODELS)}")
        results = bench_model(name, args, device)
        report["results"].append(results)
        print()
        print(table(results), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
