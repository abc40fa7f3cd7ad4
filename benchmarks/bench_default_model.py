"""Seconds per image of the shipped default model, once loaded.

    python benchmarks/bench_default_model.py [--steps 20] [--runs 10] [--sampler "DPM++ 2M Karras"]

Loads the model through the ordinary engine, warms up, then times whole ``Engine.generate`` calls
(text encoding, denoising, VAE decode, post-processing) for each task and prints the median and
the fastest run. Not part of the test suite: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from training import shapes  # noqa: E402
from webui.engine.pipeline import Engine  # noqa: E402
from webui.request import GenerationRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    engine = Engine(models_dir=str(ROOT / "models"), device=args.device)
    started = time.perf_counter()
    bundle = engine.models.get(None)
    load = time.perf_counter() - started
    scene = shapes.Scene("circle", "red", "large", "center", "white")
    init, labels = scene.render()
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 8:40] = 255
    base = dict(prompt=scene.caption(), steps=args.steps, sampler=args.sampler, seed=1)  # the model's own CFG
    pair = "green background, a big yellow triangle above a small purple circle"
    tasks = {
        "txt2img": GenerationRequest(**base),
        "img2img (strength 0.75)": GenerationRequest(task="img2img", init_image=init, strength=0.75, **base),
        "inpaint": GenerationRequest(
            task="inpaint", init_image=init, mask=Image.fromarray(mask), strength=1.0, **base
        ),
        "seg2img": GenerationRequest(task="seg2img", seg_map=shapes.class_map_image(labels), **base),
        # the prompt reader's paths (webui/builtin/layout.py): free phrasing, and two shapes (two passes)
        "txt2img, free phrasing": GenerationRequest(
            **{**base, "prompt": "blue background, big red circle in the upper left corner"}
        ),
        "txt2img, two shapes": GenerationRequest(**{**base, "prompt": pair}),
        "txt2img, two shapes, prompt as it is": GenerationRequest(
            **{**base, "prompt": pair}, extra={"read_prompt": False}
        ),
    }
    print(
        f"# {bundle.name} on {args.device}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"model load: {load:.2f} s; {args.steps} steps, {args.sampler}, CFG {bundle.default_cfg_scale:g}, 64x64, batch 1"
    )
    print("| task | median s/image | fastest s/image |")
    print("|---|---|---|")
    for name, request in tasks.items():
        engine.generate(request)  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            engine.generate(request)
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} |")


if __name__ == "__main__":
    main()
