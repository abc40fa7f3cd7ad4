"""The faster exact CPU kernels (``webui.engine.cpu_kernels``): each gives PyTorch's result to float
rounding, takes only the calls it is made for, touches nothing outside its block and thread, and
the whole pipeline with them gives the image without them."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from components import bundle_from
from diffusers.models.activations import GEGLU
from parity import assert_close

from webui.api import make_plugin_manager
from webui.cli import build_parser, memory_settings
from webui.engine import cpu_kernels
from webui.engine.cpu_kernels import CpuKernels, conv3x3_im2col, linear
from webui.engine.memory import MemoryPlan, MemorySettings
from webui.engine.pipeline import Engine
from webui.request import GenerationRequest

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no oneDNN in this PyTorch build")

REQUEST = GenerationRequest(
    prompt="a red circle", steps=3, seed=7, width=64, height=64, batch_size=2, sampler="Euler", cfg_scale=5.0
)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


# -- each kernel against PyTorch --------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gives_f_linear(bias):
    x, w = rand(2, 300, 64), rand(48, 64, seed=1)
    b = rand(48, seed=2) if bias else None
    out = linear(x, w, b)
    assert out.shape == (2, 300, 48)
    assert close(out, F.linear(x, w, b)) < 1e-5


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_im2col_convolution_gives_conv2d(channels_last, bias):
    x = rand(2, 24, 5, 7)  # odd sizes: no square or even assumption
    w = rand(16, 24, 3, 3, seed=1, scale=0.2)
    b = rand(16, seed=2) if bias else None
    if channels_last:
        x, w = (
            x.contiguous(memory_format=torch.channels_last),
            w.contiguous(memory_format=torch.channels_last),
        )
    out = conv3x3_im2col(x, w, b)
    assert out.shape == (2, 16, 5, 7)
    assert close(out, F.conv2d(x, w, b, padding=1)) < 1e-5


def test_fused_geglu_gives_the_module():
    module = GEGLU(64, 96).eval()
    x = rand(2, 40, 64, seed=3)
    with torch.no_grad():
        expected = module(x)
        with cpu_kernels.applied([module]) as mode:
            assert "forward" in module.__dict__
            out = module(x)
    assert mode.counts["geglu"] == 1
    assert out.shape == (2, 40, 96)
    assert close(out, expected) < 1e-5
    assert "forward" not in module.__dict__  # the class's forward again


def test_bfloat16_is_left_to_pytorch():
    bf16 = torch.bfloat16
    module = GEGLU(64, 96).to(bf16)
    conv = torch.nn.Conv2d(cpu_kernels.IM2COL_MIN_CHANNELS, 32, 3, padding=1).to(bf16)
    layer = torch.nn.Linear(64, 32).to(bf16)
    x = rand(2, 300, 64).to(bf16)
    image = rand(2, cpu_kernels.IM2COL_MIN_CHANNELS, 8, 8).to(bf16)
    with torch.no_grad():
        expected = [module(x), conv(image), layer(x)]
        with cpu_kernels.applied([module]) as mode:
            out = [module(x), conv(image), layer(x)]
    assert mode.counts == {"linear": 0, "im2col": 0, "geglu": 0, "attention": 0, "cfg_halves": 0}
    for own, theirs in zip(out, expected, strict=True):
        assert torch.equal(own, theirs)


# -- what the mode takes and what it leaves ---------------------------------------------------


def test_the_mode_takes_large_linears_and_leaves_small_ones():
    layer = torch.nn.Linear(64, 32)
    big, small = rand(cpu_kernels.LINEAR_MIN_ROWS, 64), rand(cpu_kernels.LINEAR_MIN_ROWS - 1, 64)
    with torch.no_grad():
        expected = layer(big)
        with CpuKernels() as mode:
            out = layer(big)
            layer(small)
    assert mode.counts["linear"] == 1
    assert close(out, expected) < 1e-5


def test_the_mode_takes_small_3x3_convolutions_only():
    channels = cpu_kernels.IM2COL_MIN_CHANNELS

    def conv2d(*args, **kwargs) -> torch.nn.Conv2d:  # channels-last weights, as --channels-last
        return torch.nn.Conv2d(*args, **kwargs).to(memory_format=torch.channels_last)

    conv = conv2d(channels, 8, 3, padding=1)
    x = rand(2, channels, 8, 8, scale=0.5)  # 128 output pixels
    others = [
        (conv2d(channels, 8, 3, padding=1, stride=2), x),
        (conv2d(channels, 8, 3, padding=0), x),
        (conv2d(channels, 8, 3, padding=2, dilation=2), x),
        (conv2d(channels, 8, 3, padding=1, groups=2), x),
        (conv2d(channels, 8, 1), x),
        (conv2d(channels, 8, 5, padding=2), x),
        (conv2d(channels, 8, 3, padding=1), rand(2, channels, 16, 16)),  # 512 pixels
        (conv2d(8, 8, 3, padding=1), rand(2, 8, 8, 8)),  # narrow
        (conv2d(channels, 8, 3, padding=1).double(), x.double()),  # not float32
        (torch.nn.Conv2d(channels, 8, 3, padding=1), x),  # plain weights: laying them out costs more
    ]
    with torch.no_grad():
        expected = conv(x)
        with CpuKernels() as mode:
            out = conv(x)
            for layer, inp in others:
                layer(inp)
    assert mode.counts["im2col"] == 1
    assert close(out, expected) < 1e-5


def test_the_mode_leaves_unusual_weights_to_pytorch():
    x = rand(cpu_kernels.LINEAR_MIN_ROWS, 64)
    transposed = rand(64, 32, seed=1).t()  # (32, 64), not contiguous
    with torch.no_grad(), CpuKernels() as mode:
        out = F.linear(x, transposed)
        F.linear(x.double(), transposed.double())
        # a bias of another dtype: PyTorch's own error, not a kernel's
        with pytest.raises(RuntimeError):
            F.linear(x, transposed.contiguous(), rand(32).double())
    assert mode.counts["linear"] == 0
    torch.testing.assert_close(out, F.linear(x, transposed))


def test_the_mode_leaves_training_alone():
    layer = torch.nn.Linear(64, 32)
    x = rand(cpu_kernels.LINEAR_MIN_ROWS, 64).requires_grad_()
    with CpuKernels() as mode:
        layer(x).sum().backward()
    assert mode.counts["linear"] == 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_mode_is_for_its_own_thread_only():
    layer = torch.nn.Linear(64, 32)
    x = rand(cpu_kernels.LINEAR_MIN_ROWS, 64)
    with torch.no_grad(), CpuKernels() as mode:
        other = threading.Thread(target=lambda: layer(x))
        other.start()
        other.join()
        assert mode.counts["linear"] == 0
        layer(x)
    assert mode.counts["linear"] == 1


def test_geglu_is_restored_after_an_error_and_left_alone_when_patched():
    plain, own = GEGLU(16, 8), GEGLU(16, 8)

    def own_forward(hidden_states):
        return hidden_states[..., :8]

    own.forward = own_forward
    with pytest.raises(RuntimeError, match="boom"), cpu_kernels.applied([plain, own]):
        assert "forward" in plain.__dict__ and own.forward is own_forward
        raise RuntimeError("boom")
    assert "forward" not in plain.__dict__ and own.forward is own_forward


def test_geglu_with_gradients_runs_the_class_forward():
    module = GEGLU(16, 8)
    x = rand(3, 16).requires_grad_()
    expected = type(module).forward(module, x)
    with cpu_kernels.applied([module]) as mode:
        out = module(x)
    assert mode.counts["geglu"] == 0
    torch.testing.assert_close(out, expected)


@pytest.fixture
def fresh_probe():
    """``available()`` probes again in the test, and again afterwards for the tests after it."""
    cpu_kernels.available.cache_clear()
    yield
    cpu_kernels.available.cache_clear()


def test_without_onednn_the_kernels_stay_off(monkeypatch, caplog, fresh_probe):
    def broken():
        raise RuntimeError("no such operator mkldnn::_linear_pointwise")

    monkeypatch.setattr(cpu_kernels, "_linear_op", broken)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.available() is False
    assert "kernels off" in caplog.text and "_linear_pointwise" in caplog.text

    module = GEGLU(16, 8)
    x, w = rand(2, 600, 16), rand(8, 16, seed=1)
    with cpu_kernels.applied([module]) as mode:
        assert "forward" not in module.__dict__
        out = F.linear(x, w)
    assert mode.counts["linear"] == 0 and torch.equal(out, F.linear(x, w))


# -- the pipeline -----------------------------------------------------------------------------


def engine(**settings) -> Engine:
    return Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), memory=MemorySettings(**settings)
    )


def pixels(result) -> np.ndarray:
    return np.stack([item.pixels.permute(1, 2, 0).numpy() for item in result.images])


def test_the_pipeline_with_the_kernels_gives_the_image_without_them(components, monkeypatch):
    # the tiny model is far below the sizes the kernels are for: lower the bounds so every linear
    # layer and every stride-1 3x3 convolution of the UNet takes them
    monkeypatch.setattr(cpu_kernels, "MIN_UNET_PARAMS", 0)
    monkeypatch.setattr(cpu_kernels, "LINEAR_MIN_ROWS", 1)
    monkeypatch.setattr(cpu_kernels, "IM2COL_MIN_CHANNELS", 1)
    monkeypatch.setattr(cpu_kernels, "IM2COL_MAX_PIXELS", 10**9)
    modes: list[CpuKernels] = []
    original = cpu_kernels.applied

    def spied(modules):
        context = original(modules)

        class Spy:
            def __enter__(self):
                mode = context.__enter__()
                modes.append(mode)
                return mode

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(cpu_kernels, "applied", spied)
    bundle = bundle_from(components)
    bundle.unet.to(memory_format=torch.channels_last)  # as --channels-last: the im2col route needs it
    plain = engine(cpu_kernels=False).generate(REQUEST, bundle=bundle)
    assert modes == []
    fast = engine().generate(REQUEST, bundle=bundle)
    (mode,) = modes
    per_step = {k: v / REQUEST.steps for k, v in mode.counts.items()}
    assert per_step["geglu"] >= 2 and per_step["im2col"] >= 10 and per_step["linear"] >= 8
    assert per_step["cfg_halves"] >= 1  # the tiny UNet's first ResNet, for one CFG half
    assert_close(pixels(fast), pixels(plain))  # within the parity tolerance, a real picture
    assert "Memory" not in fast.images[0].parameters  # exact: nothing to record
    # nothing left on the model
    assert not [m for m in bundle.unet.modules() if "forward" in m.__dict__]


def test_small_models_compiled_or_switched_off_run_without_them(components, monkeypatch):
    bundle = bundle_from(components)
    context = SimpleNamespace(device=torch.device("cpu"), bundle=bundle)

    def kind(settings: dict, plan: MemoryPlan) -> str:
        return type(engine(**settings)._kernels(context, plan)).__name__

    assert not cpu_kernels.worth_it(bundle.unet) and kind({}, MemoryPlan()) == "nullcontext"  # tiny UNet
    monkeypatch.setattr(cpu_kernels, "MIN_UNET_PARAMS", 0)
    assert cpu_kernels.worth_it(bundle.unet) and kind({}, MemoryPlan()) != "nullcontext"
    assert kind({}, MemoryPlan(compile=True)) == "nullcontext"
    assert kind({"cpu_kernels": False}, MemoryPlan()) == "nullcontext"
    context.device = torch.device("cuda")
    assert kind({}, MemoryPlan()) == "nullcontext"


def test_the_command_line_switch():
    parser = build_parser()
    assert memory_settings(parser.parse_args([])).cpu_kernels is True  # the web app
    assert memory_settings(parser.parse_args(["--no-cpu-kernels"])).cpu_kernels is False
    assert memory_settings(parser.parse_args(["generate", "--no-cpu-kernels"])).cpu_kernels is False
    assert memory_settings(parser.parse_args(["--no-cpu-kernels", "generate"])).cpu_kernels is False


def test_the_kernel_benchmark_runs_and_reports_each_kernel(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--repeats", "2", "--unet", "1"])
    out = capsys.readouterr().out
    float32 = [row["operation"].split()[0] for row in rows if row["dtype"] == "float32"]
    assert float32 == ["linear", "GEGLU", "conv", "UNet"]
    (unet,) = [row for row in rows if row["dtype"] == "float32" and row["operation"] == "UNet call"]
    assert unet["pytorch_s"] > 0 and unet["kernel_s"] > 0 and unet["difference"] < 1e-4
    assert unet["counts"]["geglu"] > 0 and "| float32 | " in out and "| UNet call" in out
    for row in rows:
        if row["operation"] == "UNet call":
            continue
        assert row["pytorch_ms"] > 0 and row["kernel_ms"] > 0
        assert row["difference"] < (1e-5 if row["dtype"] == "float32" else 2e-2)
        assert f"| {row['dtype']} | {row['operation']} |" in out
