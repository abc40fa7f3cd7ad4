"""Stock diffusers against Latent Studio's engine, side by side in one process, on the same work.

Builds SD 1.5 and SDXL *architecture* models with random weights (their compute is that of the
real models; no weights are downloaded), runs diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` twice — **stock** (default settings: fp32 on the CPU, fp16 on a GPU)
and **tuned** (what a diffusers user gets with a few extra arguments: bf16 on CPUs that compute it
natively, fp16 on GPUs, a channels-last UNet, SDPA attention) — then our engine with its best
settings (``--dtype auto``'s choice, SDPA, automatic memory plan) on the same modules, size, steps,
sampler (Euler) and seed, and prints per model: seconds per step (between the first and the last
step, so text encoding and VAE decode are out of it), the fixed cost (the rest of the call), seconds
per image, peak RAM (and its rise during the call), peak VRAM on a GPU, and ours against each. Also
the cost of one live-preview decode as a share of a step.

    python benchmarks/bench_vs_diffusers.py                         # SD 1.5 512 and SDXL 1024, 20 steps
    python benchmarks/bench_vs_diffusers.py --models sd15 --steps 20
    python benchmarks/bench_vs_diffusers.py --models sdxl --steps 4 # SDXL on a CPU takes minutes a step
    python benchmarks/bench_vs_diffusers.py --device cuda --ours-memory lowest   # lowest-memory plan's VRAM
    python benchmarks/bench_vs_diffusers.py --device cuda --models sdxl --vram-cap-gb 8
    python benchmarks/bench_vs_diffusers.py --tiny --steps 2        # scaled-down check, seconds

All setups run on one set of modules, converted in place to each one's dtype and memory layout
before its run, so the process never holds two copies of the weights (SDXL in fp32 is about 14 GB).
``--setups`` runs a subset (e.g. ``tuned,ours``), in the order stock, tuned, ours-plain, ours; the
setup ``ours-plain`` is ours without the faster CPU kernels (``--no-cpu-kernels``), to show what they
are worth. ``--rounds N`` runs them all N times, alternating, each round starting one setup later,
and reports medians and each round's ratio: on a machine whose speed drifts by minutes this is the
measurement to trust. ``--tuned-dtype float32`` compares with a float32 tuned diffusers on a CPU that
has bf16 (with ``--ours-dtype float32``).

    python benchmarks/bench_vs_diffusers.py --models sd15 --steps 8 --setups tuned,ours --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webui.engine import cpu_kernels  # noqa: E402
from webui.engine.bundle import ModelBundle  # noqa: E402
from webui.engine.clip_tokenizer import clip_tokenizer  # noqa: E402
from webui.engine.memory import MemorySettings, auto_dtype, trim_heap  # noqa: E402
from webui.engine.pipeline import Engine  # noqa: E402
from webui.engine.preview import preview_images  # noqa: E402
from webui.plugins import make_plugin_manager  # noqa: E402
from webui.request import GenerationRequest  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"
SIZES = {"sd15": 512, "sdxl": 1024}
SETUPS = ("stock", "tuned", "ours-plain", "ours")  # the order of a round


# -- models -------------------------------------------------------------------------------------


def family_config(name: str, tiny: bool) -> dict[str, Any]:
    config = json.loads(
        (ROOT / "webui" / "configs" / ("sd1.json" if name == "sd15" else "sdxl.json")).read_text()
    )
    if not tiny:
        return config
    # the same block types, a fraction of the width and depth
    unet, vae = config["unet"], config["vae"]
    vae.update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1, sample_size=64)
    for encoder in config["text_encoders"]:
        encoder["config"].update(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
    if name == "sd15":
        unet.update(
            block_out_channels=[32, 32, 64, 64],
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            sample_size=8,
        )
    else:
        unet.update(
            block_out_channels=[32, 64, 64],
            layers_per_block=1,
            attention_head_dim=[4, 8, 8],
            transformer_layers_per_block=[1, 1, 1],
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            sample_size=8,
        )
    return config


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` (built on the meta device) in CPU memory with random weights: normals for
    matrices and convolutions, ones and zeros for norms, zeros for biases, arange position ids.
    Far faster than the libraries' own initialisation for billions of parameters."""
    module = module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                buffer.zero_()
    return module.eval()


def build(name: str, tiny: bool) -> dict[str, Any]:
    """Pipeline components of ``name`` ("sd15" or "sdxl") with random weights, on the CPU, fp32."""
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    config = family_config(name, tiny)
    clean = {k: v for k, v in config["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean)
        vae = AutoencoderKL.from_config({k: v for k, v in config["vae"].items() if not k.startswith("_")})
        encoders = [
            getattr(transformers, spec["class"])(transformers.CLIPTextConfig(**spec["config"]))
            for spec in config["text_encoders"]
        ]
    components: dict[str, Any] = {
        "unet": _randomised(unet, 0),
        "vae": _randomised(vae, 1),
        "scheduler": EulerDiscreteScheduler.from_config(
            {k: v for k, v in config["scheduler"].items() if k != "_class_name"}
        ),
    }
    tokenizers = [
        clip_tokenizer(pad_token=spec.get("pad_token", "<|endoftext|>")) for spec in config["tokenizers"]
    ]
    for index, encoder in enumerate(encoders):
        suffix = "" if index == 0 else f"_{index + 1}"
        components[f"text_encoder{suffix}"] = _randomised(encoder, 2 + index)
        components[f"tokenizer{suffix}"] = tokenizers[index]
    return components


def stock_pipeline(name: str, components: dict[str, Any]) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if name == "sd15":
        return StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)


def our_bundle(name: str, components: dict[str, Any]) -> ModelBundle:
    sdxl = name == "sdxl"
    return ModelBundle(
        name=f"random-{name}",
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=[components["text_encoder"]] + ([components["text_encoder_2"]] if sdxl else []),
        tokenizers=[components["tokenizer"]] + ([components["tokenizer_2"]] if sdxl else []),
        scheduler_config=dict(components["scheduler"].config),
        family="sdxl" if sdxl else "sd1",
        config={"force_zeros_for_empty_prompt": True} if sdxl else {},
    )


# -- measuring ----------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident memory every 20 ms while active."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(run: Callable[[Callable[[], None]], Any], device: torch.device) -> dict[str, Any]:
    """Time ``run(step_hook)``; ``step_hook`` is called after every denoising step."""
    stamps: list[float] = []
    gc.collect()
    trim_heap()  # the resident memory a run starts from is what is alive: peaks compare across processes
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with PeakRSS() as rss:
        started = time.perf_counter()
        output = run(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    steps = len(stamps)
    per_step = (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else seconds
    return {
        "s_per_step": per_step,
        "fixed_s": max(0.0, seconds - per_step * steps),  # text encoding, VAE decode, the rest
        "s_per_image": seconds,
        "steps": steps,
        "peak_ram_gb": rss.peak / 2**30,
        "ram_rise_gb": (rss.peak - rss.before) / 2**30,
        "peak_vram_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "output": output,
    }


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = args.size or (64 if args.tiny else SIZES[name])
    print(f"\n## {name}: building random weights...", file=sys.stderr, flush=True)
    components = build(name, args.tiny)
    params = sum(p.numel() for p in components["unet"].parameters())
    results: dict[str, Any] = {
        "model": name,
        "size": size,
        "steps": args.steps,
        "unet_params": params,
        "rounds": args.rounds,
    }
    setups = [key for key in SETUPS if key in {part.strip() for part in args.setups.split(",")}]
    # one set of modules for every setup, converted in place before each run (never two copies of
    # the weights: SDXL in fp32 is about 14 GB)
    modules = [
        components[key] for key in ("unet", "vae", "text_encoder", "text_encoder_2") if key in components
    ]
    tuned_dtype = (
        auto_dtype(device, params) if args.tuned_dtype == "auto" else getattr(torch, args.tuned_dtype)
    )
    ours_dtype = auto_dtype(device, params) if args.ours_dtype == "auto" else getattr(torch, args.ours_dtype)

    def prepare(dtype: torch.dtype, channels_last: bool) -> None:
        for module in modules:
            module.to(device, dtype)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        components["unet"].to(memory_format=layout)
        gc.collect()

    pipe = stock_pipeline(name, components) if {"stock", "tuned"} & set(setups) else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)

    def diffusers_run(step: Callable[[], None]) -> Any:
        def hook(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            step()
            return kwargs

        return pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=args.steps,
            height=size,
            width=size,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            callback_on_step_end=hook,
        ).images[0]

    bundle = our_bundle(name, components)
    settings = (
        MemorySettings(offload="sequential", vae_slicing="on", vae_tiling="on")
        if args.ours_memory == "lowest"
        else MemorySettings(channels_last=args.ours_channels_last, compile=args.ours_compile)
    )

    def our_engine(memory: MemorySettings) -> Engine:
        plugins = make_plugin_manager(entry_points=False, plugin_dirs=[])
        return Engine(plugins=plugins, device=device, dtype=ours_dtype, memory=memory)

    engines = {
        "ours": our_engine(settings),
        "ours-plain": our_engine(dataclasses.replace(settings, cpu_kernels=False)),
    }
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=args.steps,
        cfg_scale=7.0,
        seed=args.seed,
        width=size,
        height=size,
        sampler="Euler",
    )
    last: dict[str, Any] = {}

    def our_run(engine: Engine) -> Callable[[Callable[[], None]], Any]:
        def run(step: Callable[[], None]) -> Any:
            def hook(info: Any) -> None:
                step()
                last["latents"] = info.latents

            return engine.generate(request, bundle=bundle, callback=hook).images[0]

        return run

    # stock: default settings (fp32 on the CPU, fp16 on a GPU); tuned: the half precision the
    # hardware computes natively, channels-last, SDPA (diffusers' default attention on torch 2);
    # ours-plain: ours without the CPU kernels, to show what they are worth
    runs = {
        "stock": (torch.float16 if device.type == "cuda" else torch.float32, False, diffusers_run),
        "tuned": (tuned_dtype, True, diffusers_run),
        "ours-plain": (ours_dtype, args.ours_channels_last, our_run(engines["ours-plain"])),
        # (the CPU kernels keep a bf16 UNet channels-last: so it is before each run, as in use)
        "ours": (
            ours_dtype,
            args.ours_channels_last or _kept_channels_last(ours_dtype, device, settings, params),
            our_run(engines["ours"]),
        ),
    }

    # compile first (the first call at a size compiles), so the measured calls are the steady state
    if args.ours_compile and "ours" in setups:
        print(f"## {name}: compiling our UNet...", file=sys.stderr, flush=True)
        prepare(ours_dtype, args.ours_channels_last)
        started = time.perf_counter()
        engines["ours"].generate(dataclasses.replace(request, steps=2), bundle=bundle)
        results["compile_s"] = time.perf_counter() - started

    measured: dict[str, list[dict[str, Any]]] = {key: [] for key in setups}
    for round_ in range(args.rounds):
        # each round starts one setup later, so no setup always runs first (or right after another)
        order = setups[round_ % len(setups) :] + setups[: round_ % len(setups)] if setups else []
        for key in order:
            dtype, channels_last, run = runs[key]
            prepare(dtype, channels_last)
            kind = str(dtype).removeprefix("torch.") + (", channels-last UNet" if channels_last else "")
            print(
                f"## {name}: {key} ({kind}), round {round_ + 1}/{args.rounds}...", file=sys.stderr, flush=True
            )
            entry = measure(run, device)
            output = entry.pop("output")
            entry["dtype"] = str(dtype).removeprefix("torch.")
            entry["layout"] = "channels-last" if channels_last else "standard"
            if key.startswith("ours"):  # the memory plan the engine chose, as the image records it
                entry["memory"] = output.parameters.get("Memory", "default")
            measured[key].append(entry)
    for key, entries in measured.items():
        results[key] = summary(entries)

    # one live-preview decode of the final latents, against one step
    if "latents" in last:
        latents = last["latents"]
        preview_images(bundle, latents)  # the first call fits the latent->RGB map once per VAE
        started = time.perf_counter()
        for _ in range(5):
            preview_images(bundle, latents)
        results["preview_s"] = (time.perf_counter() - started) / 5
    pipe = bundle = engines = None
    gc.collect()
    return results


def _kept_channels_last(
    dtype: torch.dtype, device: torch.device, settings: MemorySettings, params: int
) -> bool:
    """Whether the engine's CPU kernels put (and keep) the UNet in channels-last layout."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and settings.cpu_kernels
        and not settings.compile
        and params >= cpu_kernels.MIN_UNET_PARAMS
    )


def summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One setup's runs: medians of the times, the largest peaks, and each run's time per step."""
    result = dict(entries[-1])
    for key in ("s_per_step", "fixed_s", "s_per_image"):
        result[key] = statistics.median(entry[key] for entry in entries)
    for key in ("peak_ram_gb", "ram_rise_gb", "peak_vram_gb"):
        values = [entry[key] for entry in entries if entry[key] is not None]
        result[key] = max(values) if values else None
    result["runs"] = [entry["s_per_step"] for entry in entries]
    return result


def table(results: dict[str, Any], device: torch.device) -> str:
    rows = [("stock diffusers", "stock"), ("tuned diffusers", "tuned")]
    if "ours-plain" in results:
        rows.append(("Latent Studio without CPU kernels", "ours-plain"))
    ours = results.get("ours")

    def vram(entry: dict[str, Any]) -> str:
        return f"{entry['peak_vram_gb']:.2f}" if entry["peak_vram_gb"] is not None else "—"

    def row(label: str, entry: dict[str, Any]) -> str:
        kind = entry["dtype"] + (", channels-last" if entry.get("layout") == "channels-last" else "")
        return (
            f"| {label} | {kind} | {entry['s_per_step']:.3f} | {entry['fixed_s']:.2f} | {entry['s_per_image']:.2f} | "
            f"{entry['peak_ram_gb']:.2f} | {entry['ram_rise_gb']:.2f} | {vram(entry)} |"
        )

    def ratio(other: dict[str, Any], key: str) -> str:
        if ours is None or not other.get(key) or ours.get(key) is None:
            return "—"
        return f"{ours[key] / other[key]:.2f}"

    lines = [
        f"### {results['model']}, {results['size']}x{results['size']}, {results['steps']} steps, Euler, CFG 7, "
        f"UNet {results['unet_params'] / 1e6:.0f} M parameters"
        + (f", {results['rounds']} rounds (medians; peaks the largest)" if results["rounds"] > 1 else ""),
        "",
        "| | dtype | s/step | fixed s | s/image | peak RAM GB | RAM rise GB | peak VRAM GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(label, results[key]) for label, key in rows if key in results]
    if ours is not None:
        lines.append(row(f"Latent Studio ({ours['memory']})", ours))
        for _, key in rows:
            if key in results:
                other = results[key]
                lines.append(
                    f"| ours / {key} | | {ratio(other, 's_per_step')} | {ratio(other, 'fixed_s')} | "
                    f"{ratio(other, 's_per_image')} | {ratio(other, 'peak_ram_gb')} | "
                    f"{ratio(other, 'ram_rise_gb')} | "
                    f"{ratio(other, 'peak_vram_gb') if device.type == 'cuda' else '—'} |"
                )
        if results["rounds"] > 1:
            lines.append("")
            for _, key in rows:
                if key in results:
                    each = [a / b for a, b in zip(ours["runs"], results[key]["runs"], strict=True)]
                    lines.append(
                        f"Per step, ours / {key} in each round: {', '.join(f'{r:.2f}' for r in each)} "
                        f"(median {statistics.median(each):.2f})."
                    )
        lines += [
            "",
            f"Live preview (latent→RGB map): {results['preview_s'] * 1000:.2f} ms, "
            f"{100 * results['preview_s'] / ours['s_per_step']:.3f} % of one of our steps.",
        ]
        if "compile_s" in results:
            lines.append(
                f"Compiling our UNet (a 2-step generation before the measured one): {results['compile_s']:.1f} s."
            )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"# {cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument(
        "--size", type=int, default=None, help="default: 512 for sd15, 1024 for sdxl (64 with --tiny)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--ours-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument(
        "--ours-memory",
        default="auto",
        choices=("auto", "lowest"),
        help="lowest: sequential offload, sliced and tiled VAE (the lowest-memory plan)",
    )
    parser.add_argument(
        "--vram-cap-gb",
        type=float,
        default=None,
        help="CUDA: cap our run's memory (torch.cuda.set_per_process_memory_fraction)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="scaled-down architectures at 64 px: a quick check"
    )
    parser.add_argument(
        "--ours-channels-last", action="store_true", help="ours with --channels-last (convolutions)"
    )
    parser.add_argument(
        "--ours-compile",
        action="store_true",
        help="ours with --compile (torch.compile of the UNet; compiled by a warm-up generation first)",
    )
    parser.add_argument(
        "--setups",
        default="stock,tuned,ours",
        help="comma-separated subset of stock, tuned, ours-plain (ours with --no-cpu-kernels), ours",
    )
    parser.add_argument(
        "--tuned-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="tuned diffusers' dtype (auto: bf16 on CPUs that compute it natively, fp16 on GPUs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the setups this many times, alternating (each round starting one setup later), and "
        "report medians: a machine whose speed drifts then slows all setups alike",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    for library in ("diffusers", "transformers"):
        __import__(f"{library}.utils.logging", fromlist=["set_verbosity_error"]).set_verbosity_error()
    header = machine(device)
    print(header)
    report: dict[str, Any] = {"machine": header, "results": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in SIZES:
            raise SystemExit(f"unknown model {name!r}: choose sd15, sdxl")
        results = bench_model(name, copy.copy(args), device)
        report["results"].append(results)
        print()
        print(table(results, device), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
