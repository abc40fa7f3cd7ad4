"""The bfloat16 CPU attention kernel (``webui.engine.cpu_attention``): as close to float32 attention
as PyTorch's own bfloat16 kernel on every shape SD-style models give it (ragged counts, odd and
large head sizes, strided views), only for the calls it is made for, and off with a reason where it
cannot run. Skipped where the CPU has no AVX-512 BF16 or there is no C++ compiler; the fallbacks
are tested everywhere."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from components import bundle_from
from diffusers.models.attention_processor import Attention
from test_cpu_kernels import REQUEST, engine, pixels

from webui.engine import cpu_attention, cpu_kernels

BF16 = torch.bfloat16


def _available_built_elsewhere() -> bool:
    """``cpu_attention.available()``, built into a temporary cache folder rather than the user's
    (the loaded library stays for the process; the file may go)."""
    saved = os.environ.get("LATENT_STUDIO_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="latent-studio-kernel-") as folder:
        os.environ["LATENT_STUDIO_CACHE_DIR"] = folder
        try:
            return cpu_attention.available()
        finally:
            if saved is None:
                os.environ.pop("LATENT_STUDIO_CACHE_DIR", None)
            else:
                os.environ["LATENT_STUDIO_CACHE_DIR"] = saved


kernel = pytest.mark.skipif(
    not _available_built_elsewhere(), reason="no AVX-512 BF16 CPU or no C++ compiler: the kernel is off here"
)


def heads(batch: int, rows: int, n_heads: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """``[batch, heads, rows, dim]`` laid out as diffusers' processors make it: a transposed view
    of ``[batch, rows, heads, dim]``."""
    x = torch.randn(batch, rows, n_heads, dim, generator=torch.Generator().manual_seed(seed)) * scale
    return x.to(BF16).transpose(1, 2)


def errors(q, k, v, **kwargs) -> tuple[float, float]:
    """(ours, PyTorch's bfloat16) largest difference from float32 attention."""
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    ours = cpu_attention.attention(q, k, v, scale=kwargs.get("scale"))
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ours.dtype == BF16 and ours.shape == theirs.shape
    return float((ours.float() - expected).abs().max()), float((theirs.float() - expected).abs().max())


@kernel
@pytest.mark.parametrize(
    "batch, n_heads, queries, keys, dim",
    [
        (2, 8, 1024, 1024, 40),  # SD 1.5 self-attention (at a 256 px image's top level)
        (2, 8, 1024, 77, 40),  # cross-attention to the prompt's 77 tokens
        (2, 5, 600, 600, 64),  # SD 2 / SDXL head size; ragged counts
        (1, 8, 513, 300, 80),  # one query past a block, keys not a multiple of 16
        (2, 4, 700, 50, 160),  # SD 1.5's deepest head size, 10 vectors of dims
        (1, 3, 530, 45, 37),  # an odd head size: pairs and vectors padded
        (1, 1, 1024, 1024, 512),  # the VAE's single-head attention
        (1, 2, 512, 1, 8),  # a single key: probabilities of 1
    ],
)
def test_the_kernel_is_as_close_to_float32_as_pytorch(batch, n_heads, queries, keys, dim):
    q, k, v = (heads(batch, n, n_heads, dim, seed) for n, seed in ((queries, 0), (keys, 1), (keys, 2)))
    ours, theirs = errors(q, k, v)
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


@kernel
def test_scale_contiguous_inputs_and_peaked_scores():
    q, k, v = (heads(1, n, 2, 40, seed, scale=4.0).contiguous() for n, seed in ((640, 0), (200, 1), (200, 2)))
    for scale in (None, 0.05, 1.0):  # 1.0: scores in the hundreds, softmax nearly one-hot
        ours, theirs = errors(q, k, v, scale=scale)
        assert ours <= 2 * theirs + 1e-3, (scale, ours, theirs)


@kernel
def test_broadcast_keys_and_one_thread(monkeypatch):
    q = heads(3, 600, 2, 40, 0)
    k, v = (heads(1, 90, 2, 40, seed).expand(3, -1, -1, -1) for seed in (1, 2))  # stride 0 on batch
    many = cpu_attention.attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert float((many.float() - expected).abs().max()) < 2e-2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cpu_attention.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each row's sums in the same order whatever the threads


@kernel
def test_not_a_number_stays_visible():
    q, k, v = (heads(1, 600, 1, 40, seed) for seed in (0, 1, 2))
    q = q.clone()
    q[0, 0, 5, 3] = float("nan")
    out = cpu_attention.attention(q, k, v)
    assert torch.isnan(out[0, 0, 5]).all() and not torch.isnan(out[0, 0, 6]).any()


def test_it_takes_only_the_calls_it_is_made_for(monkeypatch):
    monkeypatch.setattr(cpu_attention, "available", lambda: True)
    q, k, v = (heads(1, n, 2, 40, seed) for n, seed in ((600, 0), (77, 1), (77, 2)))
    assert cpu_attention.takes((q, k, v), {})
    assert cpu_attention.takes(
        (q, k, v), {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": 0.1}
    )
    mask = torch.zeros(600, 77, dtype=BF16)
    refused = [
        ((q, k, v), {"attn_mask": mask}),
        ((q, k, v, mask), {}),
        ((q, k, v), {"dropout_p": 0.1}),
        ((q, k, v), {"is_causal": True}),
        ((q, k, v), {"enable_gqa": True}),
        ((q, k, v), {"scale": -0.1}),  # a negative scale turns the running maximum around
        ((q, k, v), {"scale": float("nan")}),
        ((q.float(), k.float(), v.float()), {}),  # float32: PyTorch's
        ((q[:, :, : cpu_attention.MIN_QUERIES - 1], k, v), {}),  # too few queries to gain
        ((q, k, v[..., :20]), {}),  # values of another head size
        ((q, k[:, :1], v[:, :1]), {}),  # heads that do not match
        ((q[0], k[0], v[0]), {}),  # 3-D
        ((q.transpose(2, 3).contiguous().transpose(2, 3), k, v), {}),  # last dim strided
        ((q, k[:, :, :0], v[:, :, :0]), {}),  # no keys
        ((heads(1, 600, 1, 2048, 0), heads(1, 8, 1, 2048, 1), heads(1, 8, 1, 2048, 2)), {}),  # head too big
    ]
    for args, kwargs in refused:
        assert not cpu_attention.takes(args, kwargs), (len(args), kwargs)
    with torch.enable_grad():
        assert not cpu_attention.takes((q.detach().requires_grad_(), k, v), {})
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    assert not cpu_attention.takes((q, k, v), {})


@kernel
def test_the_mode_routes_a_diffusers_attention_through_it_and_nothing_else():
    own = Attention(query_dim=64, heads=2, dim_head=32).to(BF16).eval()
    cross = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).to(BF16).eval()
    x = torch.randn(2, 600, 64, generator=torch.Generator().manual_seed(0)).to(BF16)
    context = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(1)).to(BF16)
    small = x[:, :100]
    with torch.no_grad():
        expected = [own(x), cross(x, context), own(small)]
        with cpu_kernels.applied([own, cross]) as mode:
            out = [own(x), cross(x, context), own(small)]
    assert mode.counts["attention"] == 2  # the 100-query call went to PyTorch
    torch.testing.assert_close(out[2], expected[2], rtol=0, atol=0)
    for own, theirs in zip(out[:2], expected[:2], strict=True):
        assert float((own.float() - theirs.float()).abs().max()) < 3e-2


@kernel
def test_the_bfloat16_pipeline_with_it_gives_the_image_without_it(components, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_UNET_PARAMS", 0)
    monkeypatch.setattr(cpu_attention, "MIN_QUERIES", 1)  # the tiny model's 64 px latents: 64 queries
    counts: list[dict[str, int]] = []
    original = cpu_kernels.CpuKernels.__exit__

    def spied_exit(self, *exc):
        counts.append(dict(self.counts))
        return original(self, *exc)

    monkeypatch.setattr(cpu_kernels.CpuKernels, "__exit__", spied_exit)
    exact = pixels(engine(cpu_kernels=False).generate(REQUEST, bundle=bundle_from(components)))  # float32
    bundle = bundle_from(
        {k: v.to(BF16) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    )
    plain = engine(cpu_kernels=False).generate(REQUEST, bundle=bundle)
    assert counts == []
    fast = engine().generate(REQUEST, bundle=bundle)
    assert counts and counts[0]["attention"] >= REQUEST.steps
    assert bundle.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # bf16: kept so
    # bfloat16 rounding moves pixels by a few levels either way: the kernel's image is as close to
    # the float32 one as PyTorch's bfloat16 image is, and close to that image itself
    ours, theirs = (float(np.abs(pixels(result) - exact).max()) for result in (fast, plain))
    print(f"largest pixel difference from float32: ours {ours:.4f}, PyTorch's {theirs:.4f}")
    assert ours <= 1.5 * theirs + 0.01
    assert float(np.abs(pixels(fast) - pixels(plain)).mean()) < 0.005
    assert "Memory" not in fast.images[0].parameters


# -- off, with a reason -----------------------------------------------------------------------


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build into an empty cache folder, probed again in the test; afterwards the kernel is
    loaded again as before (built outside the user's cache folder)."""
    monkeypatch.setenv("LATENT_STUDIO_CACHE_DIR", str(tmp_path))
    cpu_attention._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()  # the test's patches (no CPU support, no compiler) off before loading again
    cpu_attention._library.cache_clear()
    _available_built_elsewhere()


def test_a_cpu_without_the_instructions_keeps_pytorch(monkeypatch, fresh_build):
    monkeypatch.setattr(cpu_attention, "cpu_supported", lambda: False)
    assert not cpu_attention.available()
    assert not list(fresh_build.iterdir())  # nothing compiled for a CPU that could not run it
    with pytest.raises(RuntimeError, match="not available"):
        cpu_attention.attention(*(heads(1, 600, 1, 8, seed) for seed in range(3)))


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    text = {
        "yes": "processor: 0\nflags\t\t: fpu fma avx512f avx512bw avx512vl avx512dq avx512_bf16\n",
        "no": "flags: fpu fma avx2\n",
    }
    for answer, content in text.items():
        (tmp_path / answer).write_text(content)

    def fake(answer):
        def opener(path, *args, **kwargs):
            return real_open(tmp_path / answer if path == "/proc/cpuinfo" else path, *args, **kwargs)

        return opener

    monkeypatch.setattr(cpu_attention.sys, "platform", "linux")
    monkeypatch.setattr(cpu_attention.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(builtins, "open", fake("yes"))
    assert cpu_attention.cpu_supported()
    monkeypatch.setattr(builtins, "open", fake("no"))
    assert not cpu_attention.cpu_supported()
    monkeypatch.setattr(cpu_attention.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(builtins, "open", fake("yes"))
    assert not cpu_attention.cpu_supported()


def test_no_compiler_or_a_failing_one_keeps_pytorch_with_a_warning(
    monkeypatch, caplog, fresh_build, tmp_path
):
    monkeypatch.setattr(cpu_attention, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert not cpu_attention.available()
    assert "no C++ compiler" in caplog.text

    cpu_attention._library.cache_clear()
    caplog.clear()
    broken = tmp_path / "broken-cxx"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo broken 1.0 && exit 0\necho "error: cannot compile" >&2\nexit 1\n'
    )
    broken.chmod(0o755)
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: str(broken))
    with caplog.at_level(logging.WARNING):
        assert not cpu_attention.available()
    assert "compiling it failed (error: cannot compile)" in caplog.text
    left = [p.name for p in (fresh_build / cpu_attention.CACHE_SUBDIR).iterdir()]
    assert left == []  # the failed build's temporary file is gone
    # and in the mode, attention goes to PyTorch
    q, k, v = (heads(1, 600, 2, 40, seed) for seed in range(3))
    with cpu_kernels.applied([]) as mode:
        out = F.scaled_dot_product_attention(q, k, v)
    assert mode.counts["attention"] == 0 and torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@kernel
def test_the_build_is_cached_and_a_disagreeing_kernel_is_refused(monkeypatch, caplog, fresh_build):
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(list(command))
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(cpu_attention.subprocess, "run", counting_run)
    assert cpu_attention.available()
    built = list((fresh_build / cpu_attention.CACHE_SUBDIR).glob("cpu_attention-*.so"))
    assert len(built) == 1 and sum("-o" in c for c in calls) == 1
    cpu_attention._library.cache_clear()
    calls.clear()
    assert cpu_attention.available()  # the next process loads the cached build
    assert sum("-o" in c for c in calls) == 0

    cpu_attention._library.cache_clear()
    real = cpu_attention._run

    def wrong(library, q, k, v, scale):
        return real(library, q, k, v, scale) + 1

    monkeypatch.setattr(cpu_attention, "_run", wrong)
    with caplog.at_level(logging.WARNING):
        assert not cpu_attention.available()
    assert "disagrees" in caplog.text


@kernel
def test_the_kernel_benchmark_reports_attention_and_a_bfloat16_unet_call(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(cpu_attention, "MIN_QUERIES", 1)  # the quick UNet's 8x8 latents: 64 queries
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--repeats", "2", "--unet", "1", "--unet-dtype", "bfloat16"])
    out = capsys.readouterr().out
    (attention,) = [row for row in rows if row["operation"].startswith("attention")]
    assert attention["dtype"] == "bfloat16" and attention["kernel_ms"] > 0 and attention["difference"] < 2e-2
    assert f"| bfloat16 | {attention['operation']} |" in out
    (unet,) = [row for row in rows if row["operation"] == "UNet call"]
    assert (
        unet["dtype"] == "bfloat16" and unet["counts"]["attention"] > 0 and unet["counts"]["cfg_halves"] > 0
    )
    # a random UNet amplifies bfloat16 rounding: each route's difference from float32 is reported
    theirs, ours = unet["float32_difference"]
    assert 0 < theirs < 0.2 and 0 < ours < 0.2
    assert "| bfloat16 | " in out.split("UNet call, PyTorch s")[1]


def test_bfloat16_modules_go_channels_last_and_float32_ones_stay():
    bf16 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3)).to(BF16)
    fp32 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        expected = bf16(x.to(BF16))
        with cpu_kernels.applied([bf16, fp32]):
            pass
        assert bf16[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert fp32[0].weight.is_contiguous() and not fp32[0].weight.is_contiguous(
            memory_format=torch.channels_last
        )
        torch.testing.assert_close(bf16(x.to(BF16)), expected)  # the layout changes no result
