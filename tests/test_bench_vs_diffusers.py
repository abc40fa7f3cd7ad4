"""The side-by-side benchmark script runs end to end on scaled-down SD 1.5 and SDXL architectures
(the full-size run is by hand; its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_vs_diffusers", ROOT / "benchmarks" / "bench_vs_diffusers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_the_three_setups_and_writes_json(tmp_path, capsys):
    bench = load_script()
    report = bench.main(["--tiny", "--steps", "2", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert out.count("| stock diffusers | float32 |") == 2 and out.count("| Latent Studio (") == 2
    assert out.count("| ours / stock |") == 2 and "Live preview" in out
    assert (
        out.count("| tuned diffusers | float32, channels-last |") == 2 and out.count("| ours / tuned |") == 2
    )
    written = json.loads((tmp_path / "r.json").read_text())
    assert (
        [r["model"] for r in written["results"]]
        == ["sd15", "sdxl"]
        == [r["model"] for r in report["results"]]
    )
    for result in written["results"]:
        assert result["size"] == 64 and result["steps"] == 2
        assert result["tuned"]["layout"] == "channels-last" and result["stock"]["layout"] == "standard"
        for side in ("stock", "tuned", "ours"):
            entry = result[side]
            assert entry["steps"] == 2  # the step hook fired once per step
            assert 0 < entry["s_per_step"] < entry["s_per_image"] and math.isfinite(entry["s_per_image"])
            # the fixed cost is the rest of the call: text encoding, VAE decode
            assert 0 <= entry["fixed_s"] < entry["s_per_image"]
            assert entry["fixed_s"] == pytest.approx(entry["s_per_image"] - 2 * entry["s_per_step"], abs=1e-9)
            assert entry["peak_ram_gb"] > 0.05 and entry["peak_vram_gb"] is None
        assert 0 < result["preview_s"] < result["ours"]["s_per_image"]


def test_ours_compiled_is_compiled_first_then_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LATENT_STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    bench = load_script()
    report = bench.main(
        [
            "--tiny",
            "--models",
            "sd15",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--setups",
            "ours",
            "--ours-compile",
        ]
    )
    out = capsys.readouterr().out
    result = report["results"][0]
    assert result["ours"]["memory"] == "compiled UNet" and "| Latent Studio (compiled UNet) |" in out
    assert (
        result["compile_s"] > 0
        and f"Compiling our UNet (a 2-step generation before the measured one): {result['compile_s']:.1f} s."
        in out
    )
    assert "stock" not in result and "tuned" not in result and "| ours / tuned |" not in out
    assert any((tmp_path / "cache").rglob("*.py"))  # the generated kernels were cached


def test_ours_without_the_cpu_kernels_is_measured_beside_ours(capsys):
    bench = load_script()
    argv = ["--tiny", "--models", "sd15", "--steps", "2", "--device", "cpu"]
    report = bench.main([*argv, "--setups", "tuned,ours-plain,ours", "--tuned-dtype", "bfloat16"])
    out = capsys.readouterr().out
    result = report["results"][0]
    assert result["tuned"]["dtype"] == "bfloat16" and result["ours"]["dtype"] == "float32"
    for key in ("ours-plain", "ours"):
        assert result[key]["steps"] == 2 and 0 < result[key]["s_per_step"] < result[key]["s_per_image"]
    assert "| Latent Studio without CPU kernels | float32 |" in out
    assert "| ours / ours-plain |" in out and "| ours / tuned |" in out and "stock" not in result


def test_the_random_models_have_the_real_architectures():
    bench = load_script()
    import torch
    from diffusers import UNet2DConditionModel

    for name, params in (("sd15", 859_520_964), ("sdxl", 2_567_463_684)):
        config = bench.family_config(name, tiny=False)["unet"]
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(
                {k: v for k, v in config.items() if not k.startswith("_")}
            )
        assert sum(p.numel() for p in unet.parameters()) == params  # SD 1.5's and SDXL base's UNets


def test_rounds_alternate_the_setups_and_report_medians(capsys):
    bench = load_script()
    argv = ["--tiny", "--models", "sd15", "--steps", "2", "--device", "cpu", "--setups", "ours,tuned"]
    report = bench.main([*argv, "--rounds", "3"])
    captured = capsys.readouterr()
    result = report["results"][0]
    order = [line.split(": ")[1].split(" ")[0] for line in captured.err.splitlines() if ", round " in line]
    assert order == ["tuned", "ours", "ours", "tuned", "tuned", "ours"]  # each round one setup later
    for key in ("tuned", "ours"):
        runs = result[key]["runs"]
        assert len(runs) == 3 and all(r > 0 for r in runs)
        assert result[key]["s_per_step"] == sorted(runs)[1]  # the median
    each = [a / b for a, b in zip(result["ours"]["runs"], result["tuned"]["runs"], strict=True)]
    assert "3 rounds (medians; peaks the largest)" in captured.out
    assert f"Per step, ours / tuned in each round: {', '.join(f'{r:.2f}' for r in each)}" in captured.out
