"""LoRAs: A1111's <lora:name:weight> tags, kohya files applied per request and removed exactly."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tiny import bundle_from_components, make_sdxl_components

from webui.engine.bundle import ModelBundle
from webui.engine.context import GenerationControl
from webui.engine.lora import (
    LoraRequest,
    apply_loras,
    find_lora,
    parse_lora_tags,
    prompt_loras,
    read_lora,
    strip_network_tags,
)
from webui.engine.pipeline import Engine
from webui.engine.text import encode_prompts
from webui.errors import InvalidRequestError
from webui.metadata import parse_infotext
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

BASE = dict(prompt="a red cat", steps=2, seed=7, width=64, height=64, sampler="Euler a")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
FC1 = "encoder.layers.1.mlp.fc1"
ALPHA, RANK = 1.0, 2


def kohya_name(prefix: str, module: str) -> str:
    """kohya's key for a module: the diffusers path with ``_`` for ``.`` (CLIP under ``text_model``)."""
    if prefix.startswith("lora_te"):
        module = "text_model." + module.removeprefix("text_model.")
    return prefix + module.replace(".", "_")


def kohya_layers(
    module: torch.nn.Module, prefix: str, targets: tuple[str, ...], seed: int, scale: float = 0.3
) -> dict[str, torch.Tensor]:
    """Random rank-2 kohya LoRA tensors (down, up, alpha) for every ``targets`` layer of ``module``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if not name.endswith(targets) or not hasattr(layer, "weight"):
            continue
        if prefix == "lora_unet_" and ".attentions." not in name:
            continue
        out_features, in_features = layer.weight.shape[:2]
        conv = layer.weight.dim() == 4
        down_shape = (RANK, in_features, 1, 1) if conv else (RANK, in_features)
        up_shape = (out_features, RANK, 1, 1) if conv else (out_features, RANK)
        key = kohya_name(prefix, name)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return tensors


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def delta(tensors: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
    """What a linear LoRA layer adds at weight 1: ``up(down(x)) * alpha / rank``."""
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    return (x @ down.T @ up.T) * (ALPHA / RANK)


def adapter_layers(module: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def pixels(result: Any) -> torch.Tensor:
    return result.images[0].pixels


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A models folder with two LoRAs for the tiny model: ``style`` (UNet attention and text
    encoder layers) and ``other`` (UNet only, another seed)."""
    root = tmp_path_factory.mktemp("models")
    style = {
        **kohya_layers(bundle.unet, "lora_unet_", UNET_TARGETS, 1),
        **kohya_layers(bundle.text_encoders[0], "lora_te_", TE_TARGETS, 2),
    }
    other = kohya_layers(bundle.unet, "lora_unet_", UNET_TARGETS, 3)
    write_lora(root / "lora" / "style.safetensors", style)
    write_lora(root / "lora" / "other.safetensors", other)
    return {"root": root, "style": style, "other": other}


@pytest.fixture(scope="module")
def engine(files: dict[str, Any]) -> Engine:
    return Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=str(files["root"])
    )


@pytest.fixture(scope="module")
def base(engine: Engine, bundle: ModelBundle) -> torch.Tensor:
    return pixels(engine.generate(GenerationRequest(**BASE), bundle=bundle))


def generate(engine: Engine, bundle: ModelBundle, prompt: str, **kwargs: Any) -> Any:
    return engine.generate(GenerationRequest(**{**BASE, "prompt": prompt, **kwargs}), bundle=bundle)


def assert_clean(bundle: ModelBundle) -> None:
    """No adapter layer and no peft attribute is left on the cached model."""
    for module in (bundle.unet, *bundle.text_encoders):
        assert adapter_layers(module) == []
        assert "peft_config" not in vars(module)


# --------------------------------------------------------------------------- prompt tags


def test_tags_are_parsed_like_a1111() -> None:
    text, tags = parse_lora_tags(
        "a cat <lora:ink:0.8>, <lora:film>  <lyco:grain:0.5:0.25> <lora:x:te=0.2:unet=0.9>"
    )
    assert text == "a cat ,    "
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("ink", 0.8, 0.8),
        ("film", 1.0, 1.0),
        ("grain", 0.5, 0.25),
        ("x", 0.2, 0.9),
    ]
    assert strip_network_tags("a <lora:ink:1> cat <hypernet:h:1>") == "a  cat "


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:ink:lots>", "'lots' is not a number"),
        ("<lora:ink:inf>", "finite"),
        ("<lora::1>", "needs a name"),
        ("<lora:ink:1:1:8>", "dyn"),
        ("<lora:ink:foo=1>", "unknown option 'foo'"),
        ("<hypernet:h:1>", "only LoRA extra networks"),
    ],
)
def test_bad_tags_say_what_is_wrong(prompt: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_lora_tags(prompt)


def test_repeated_tags_add_up(engine: Engine) -> None:
    loras = prompt_loras("<lora:style:0.25> x <lora:style:0.5:1> <lora:other>", engine.models)
    assert [(lo.name, lo.te_weight, lo.unet_weight) for lo in loras] == [
        ("style", 0.75, 1.25),
        ("other", 1.0, 1.0),
    ]


# --------------------------------------------------------------------------- finding files


def test_names_are_looked_up_in_the_lora_folder_and_never_as_paths(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_lora(root / "lora" / "sub" / "ink.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)})
    from webui.engine.models import ModelManager

    models = ModelManager(make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=root)
    assert find_lora("sub/ink", models) == root / "lora" / "sub" / "ink.safetensors"
    assert find_lora("ink", models) == root / "lora" / "sub" / "ink.safetensors"  # by stem, as A1111
    (tmp_path / "outside.safetensors").write_bytes(b"")
    for bad in ("../outside", "sub/../../outside", "/etc/passwd", "~/x", "sub\\ink"):
        with pytest.raises(InvalidRequestError, match="not allowed"):
            find_lora(bad, models)


def test_an_unknown_lora_names_the_available_ones(engine: Engine, bundle: ModelBundle) -> None:
    with pytest.raises(InvalidRequestError) as error:
        generate(engine, bundle, "a cat <lora:nope:1>")
    assert str(error.value) == "unknown LoRA 'nope'; available LoRAs: other, style"
    assert_clean(bundle)


def test_pickle_loras_are_refused(tmp_path: Path) -> None:
    pickle = tmp_path / "ink.pt"
    pickle.write_bytes(b"not loaded")
    models = SimpleNamespace(
        models_dir=None, list=lambda kind: [SimpleNamespace(name="ink", source=str(pickle))]
    )
    with pytest.raises(InvalidRequestError, match=r"\.pt file; only \.safetensors"):
        find_lora("ink", models)


# --------------------------------------------------------------------------- applying


def test_a_lora_changes_the_image_and_is_removed_exactly(engine, bundle, base) -> None:
    with_lora = pixels(generate(engine, bundle, "a red cat <lora:style:1>"))
    assert float((with_lora - base).abs().max()) > 1e-3
    assert_clean(bundle)
    assert torch.equal(pixels(generate(engine, bundle, "a red cat")), base)


def test_weight_zero_is_no_lora(engine, bundle, base) -> None:
    assert torch.equal(pixels(generate(engine, bundle, "a red cat <lora:style:0>")), base)


def test_weights_scale_the_patched_layers_exactly(bundle: ModelBundle, files: dict[str, Any]) -> None:
    style = files["style"]
    to_q, fc1 = bundle.unet.get_submodule(TO_Q), bundle.text_encoders[0].get_submodule(FC1)
    x_unet = torch.randn(2, 5, to_q.in_features, generator=torch.Generator().manual_seed(0))
    x_te = torch.randn(2, 5, fc1.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_q, base_fc1 = to_q(x_unet), fc1(x_te)
        d_q = delta(style, kohya_name("lora_unet_", TO_Q), x_unet)
        d_fc1 = delta(style, kohya_name("lora_te_", FC1), x_te)
        assert float(d_q.abs().max()) > 1e-2 and float(d_fc1.abs().max()) > 1e-2
        lora = read_lora(files["root"] / "lora" / "style.safetensors")
        for te, unet in ((0.5, 0.5), (1.0, 1.0), (0.3, -0.7)):
            with apply_loras(bundle, [LoraRequest("style", lora, te_weight=te, unet_weight=unet)]):
                patched_q = bundle.unet.get_submodule(TO_Q)(x_unet)
                patched_fc1 = bundle.text_encoders[0].get_submodule(FC1)(x_te)
            torch.testing.assert_close(patched_q, base_q + unet * d_q, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(patched_fc1, base_fc1 + te * d_fc1, rtol=1e-5, atol=1e-6)
        assert torch.equal(bundle.unet.get_submodule(TO_Q)(x_unet), base_q)
    assert_clean(bundle)


def test_text_encoder_and_unet_weights_apply_separately(bundle: ModelBundle, files: dict[str, Any]) -> None:
    lora = read_lora(files["root"] / "lora" / "style.safetensors")
    plain, _ = encode_prompts(bundle, ["a red cat"], [""])
    with apply_loras(bundle, [LoraRequest("style", lora, te_weight=0.0, unet_weight=1.0)]):
        unet_only, _ = encode_prompts(bundle, ["a red cat"], [""])
        assert adapter_layers(bundle.text_encoders[0]) == [] and adapter_layers(bundle.unet)
    with apply_loras(bundle, [LoraRequest("style", lora, te_weight=1.0, unet_weight=0.0)]):
        te_only, _ = encode_prompts(bundle, ["a red cat"], [""])
        assert adapter_layers(bundle.unet) == [] and adapter_layers(bundle.text_encoders[0])
    assert torch.equal(unet_only.embeds, plain.embeds)
    assert float((te_only.embeds - plain.embeds).abs().max()) > 1e-3
    assert_clean(bundle)


def test_two_loras_at_once(engine, bundle, base, files) -> None:
    root = files["root"] / "lora"
    style, other = read_lora(root / "style.safetensors"), read_lora(root / "other.safetensors")
    to_q = bundle.unet.get_submodule(TO_Q)
    x = torch.randn(1, 3, to_q.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = (
            to_q(x)
            + 0.5 * delta(files["style"], kohya_name("lora_unet_", TO_Q), x)
            + 0.25 * delta(files["other"], kohya_name("lora_unet_", TO_Q), x)
        )
        with apply_loras(
            bundle, [LoraRequest("style", style, 0.5, 0.5), LoraRequest("other", other, 0.25, 0.25)]
        ):
            both = bundle.unet.get_submodule(TO_Q)(x)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)

    one = pixels(generate(engine, bundle, "a red cat <lora:style:0.5>"))
    two = pixels(generate(engine, bundle, "a red cat <lora:style:0.5> <lora:other:0.25>"))
    assert float((two - one).abs().max()) > 1e-4
    assert torch.equal(pixels(generate(engine, bundle, "a red cat")), base)


def test_a_failing_or_interrupted_request_leaves_no_lora(engine, bundle, base) -> None:
    def fail(step: Any) -> None:
        assert adapter_layers(bundle.unet), "the LoRA is applied while the request runs"
        raise RuntimeError("boom")

    request = GenerationRequest(**{**BASE, "prompt": "a red cat <lora:style:1>"})
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(request, bundle=bundle, callback=fail)
    assert_clean(bundle)
    assert torch.equal(pixels(generate(engine, bundle, "a red cat")), base)

    control = GenerationControl()
    result = engine.generate(
        GenerationRequest(**{**BASE, "prompt": "a red cat <lora:style:1>", "batch_count": 2}),
        bundle=bundle,
        control=control,
        callback=lambda step: control.interrupt(),
    )
    assert result.interrupted
    assert_clean(bundle)
    assert torch.equal(pixels(generate(engine, bundle, "a red cat")), base)


def test_another_generation_waits_for_the_lora_request(engine, bundle, base, files) -> None:
    lora = read_lora(files["root"] / "lora" / "style.safetensors")
    entered, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def lora_request() -> None:
        with apply_loras(bundle, [LoraRequest("style", lora)]):
            entered.set()
            release.wait(10)

    def plain_request() -> None:
        results["plain"] = pixels(generate(engine, bundle, "a red cat"))

    holder = threading.Thread(target=lora_request)
    holder.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=plain_request)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "a generation must not run while another request's LoRA is applied"
    release.set()
    holder.join(10)
    waiter.join(30)
    assert torch.equal(results["plain"], base)


def test_a_lora_for_another_model_is_refused(bundle: ModelBundle, tmp_path: Path) -> None:
    path = write_lora(
        tmp_path / "xl.safetensors",
        {
            "lora_unet_down_blocks_5_attentions_9_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_down_blocks_5_attentions_9_proj_in.lora_up.weight": torch.zeros(8, 2),
        },
    )
    with pytest.raises(InvalidRequestError, match="does not fit the model"):
        with apply_loras(bundle, [LoraRequest("xl", read_lora(path))]):
            pass
    assert_clean(bundle)


def test_diffusers_format_loras_apply_at_scale_one_or_are_refused(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    to_q = bundle.unet.get_submodule(TO_Q)
    generator = torch.Generator().manual_seed(8)
    a, b = (
        torch.randn(4, to_q.in_features, generator=generator),
        torch.randn(to_q.out_features, 4, generator=generator),
    )
    tensors = {f"unet.{TO_Q}.lora_A.weight": a, f"unet.{TO_Q}.lora_B.weight": b}
    x = torch.randn(1, 3, to_q.in_features, generator=generator)
    with torch.no_grad():
        expected = to_q(x) + 0.5 * (x @ a.T @ b.T)
        with apply_loras(
            bundle, [LoraRequest("d", read_lora(write_lora(tmp_path / "d.safetensors", tensors)), 1, 0.5)]
        ):
            torch.testing.assert_close(bundle.unet.get_submodule(TO_Q)(x), expected, rtol=1e-5, atol=1e-6)
    scaled = write_lora(
        tmp_path / "scaled.safetensors",
        tensors,
        {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8}'},
    )
    with pytest.raises(InvalidRequestError, match="its own scaling"):
        with apply_loras(bundle, [LoraRequest("scaled", read_lora(scaled))]):
            pass
    assert_clean(bundle)


def test_negative_prompt_tags_are_ignored_as_in_a1111(engine, bundle) -> None:
    result = generate(engine, bundle, "a red cat", negative_prompt="blurry <lora:nope:1>")
    assert "Lora hashes" not in result.images[0].parameters
    with_tag, _ = encode_prompts(bundle, ["x"], ["blurry <lora:nope:1>"])
    plain, _ = encode_prompts(bundle, ["x"], ["blurry"])
    _, negative_tag = encode_prompts(bundle, ["x"], ["blurry <lora:nope:1>"])
    _, negative_plain = encode_prompts(bundle, ["x"], ["blurry"])
    assert torch.equal(with_tag.embeds, plain.embeds)
    assert not torch.equal(negative_tag.embeds, negative_plain.embeds)  # encoded as text, as A1111 does


def test_the_tag_never_reaches_the_text_encoder(bundle: ModelBundle) -> None:
    tagged, _ = encode_prompts(bundle, ["a red cat <lora:style:0.8>"], [""])
    plain, _ = encode_prompts(bundle, ["a red cat "], [""])
    assert torch.equal(tagged.embeds, plain.embeds)


# --------------------------------------------------------------------------- metadata


def test_lora_hashes_are_written_like_a1111(engine, bundle, files, tmp_path) -> None:
    data = (files["root"] / "lora" / "style.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    style_hash = hashlib.sha256(data[8 + header :]).hexdigest()[:12]  # kohya's "addnet" hash
    data = (files["root"] / "lora" / "other.safetensors").read_bytes()
    other_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]

    prompt = "a red cat <lora:style:0.8>, <lora:other:0.2>"
    infotext = generate(engine, bundle, prompt).infotexts[0]
    assert infotext.splitlines()[0] == prompt
    assert f'Lora hashes: "style: {style_hash}, other: {other_hash}"' in infotext
    assert parse_infotext(infotext)["Lora hashes"] == f"style: {style_hash}, other: {other_hash}"

    stamped = write_lora(
        tmp_path / "stamped.safetensors", files["other"], {"sshs_model_hash": "0123456789abcdef"}
    )
    assert read_lora(stamped).hash == "0123456789ab"  # the trainer's own hash wins, as in A1111


# --------------------------------------------------------------------------- SDXL


def test_sdxl_loras_reach_both_text_encoders_and_sgm_named_unet_blocks(tmp_path: Path) -> None:
    bundle = bundle_from_components(make_sdxl_components(tmp_path))
    te1, te2 = bundle.text_encoders
    tensors = {
        **kohya_layers(te1, "lora_te1_", ("q_proj",), 4),
        **kohya_layers(te2, "lora_te2_", ("fc1",), 5),
    }
    # kohya names SDXL's UNet blocks the sgm way: input_blocks.4.1 is down_blocks.1.attentions.0
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(6)
    tensors.update(
        {
            f"{sgm}.lora_down.weight": torch.randn(RANK, 64, generator=generator),
            f"{sgm}.lora_up.weight": torch.randn(64, RANK, generator=generator),
            f"{sgm}.alpha": torch.tensor(ALPHA),
        }
    )
    lora = read_lora(write_lora(tmp_path / "xl.safetensors", tensors))
    q = next(name for name, _ in te1.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    fc1 = next(name for name, _ in te2.named_modules() if name.endswith(FC1))  # under text_model.
    q1, fc2_1 = te1.get_submodule(q), te2.get_submodule(fc1)
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3))
    x_unet = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected_1 = q1(x) + 0.5 * delta(tensors, kohya_name("lora_te1_", q), x)
        expected_2 = fc2_1(x) + 0.5 * delta(tensors, kohya_name("lora_te2_", fc1), x)
        expected_unet = bundle.unet.get_submodule(TO_Q)(x_unet) + 1.5 * delta(tensors, sgm, x_unet)
        with apply_loras(bundle, [LoraRequest("xl", lora, te_weight=0.5, unet_weight=1.5)]):
            torch.testing.assert_close(te1.get_submodule(q)(x), expected_1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(te2.get_submodule(fc1)(x), expected_2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                bundle.unet.get_submodule(TO_Q)(x_unet), expected_unet, rtol=1e-5, atol=1e-6
            )
    assert_clean(bundle)


def test_an_lcm_lora_runs_through_the_lora_path_with_the_lcm_sampler(engine, bundle) -> None:
    """An LCM-LoRA is a UNet LoRA like any other: its prompt tag, the LCM sampler, few steps, CFG 1."""
    few = {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}
    with_lora = generate(engine, bundle, "a red cat <lora:other:1>", **few)
    plain = generate(engine, bundle, "a red cat", **few)
    assert float((pixels(with_lora) - pixels(plain)).abs().max()) > 1e-3
    infotext = with_lora.infotexts[0]
    assert "Sampler: LCM," in infotext and "Steps: 4," in infotext and "other" in infotext, infotext
    assert_clean(bundle)
