"""Original-layout ("single-file") checkpoints and ControlNets: detection, offline conversion, safety.

Tiny random diffusers components are written out in the original layout by the tests' own
converter (``ldm_format``), loaded back through the project, and compared with the originals:
every tensor, and the images the engine makes with them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from components import make_controlnet
from fixtures_models import random_image, rect_mask, seg_map
from ldm_format import controlnet_to_ldm, tiny_components, to_ldm, write_single_file
from safetensors.torch import save_file

from webui.engine.bundle import ModelBundle
from webui.engine.clip_tokenizer import clip_tokenizer
from webui.engine.files import read_safetensors_header
from webui.engine.pipeline import Engine
from webui.engine.segmap import ADE20K
from webui.engine.single_file import (
    component_configs,
    convert_checkpoint,
    convert_controlnet,
    detect_checkpoint,
    inspect_file,
    load_single_file,
)
from webui.errors import ModelLoadError
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

KINDS = ("sd1", "sd1-inpainting", "sd2-v", "sdxl", "sdxl-refiner")
RUN = dict(
    prompt="a photo of a cat",
    negative_prompt="blurry",
    sampler="Euler",
    steps=3,
    cfg_scale=7.0,
    seed=7,
    width=32,
    height=32,
)
# The families' published scheduler settings (SD 1.5, SD 2.1-v, SDXL base), written out here
SCALED_LINEAR = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
)
SCHEDULERS = {
    "sd1": dict(SCALED_LINEAR, prediction_type="epsilon", skip_prk_steps=True),
    "sd2-v": dict(SCALED_LINEAR, prediction_type="v_prediction", clip_sample=False),
    "sdxl": dict(
        SCALED_LINEAR, prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear"
    ),
}


def make_engine(**kwargs) -> Engine:
    return Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (file, original diffusers components) for every tiny model, written once."""
    folder = tmp_path_factory.mktemp("single-file")
    out = {}
    for kind in KINDS:
        components = tiny_components(kind)
        out[kind] = (
            write_single_file(folder / f"tiny-{kind}.safetensors", to_ldm(kind, components)),
            components,
        )
    return out


def reference_bundle(kind: str, components: dict) -> ModelBundle:
    """The engine's bundle over the original components, with each family's tokenizer padding."""
    family = kind.split("-")[0]
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]
    return ModelBundle(
        name="reference",
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=components["text_encoders"],
        tokenizers=[clip_tokenizer(pad_token=p) for p in pads],
        scheduler_config=SCHEDULERS["sd2-v" if family == "sd2" else family],
        family=family,
        config={"force_zeros_for_empty_prompt": True} if family == "sdxl" else {},
    )


def pixels(result) -> torch.Tensor:
    return torch.stack([item.pixels for item in result.images])


def assert_same_tensors(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    expected, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == []


# -- the tokenizer --------------------------------------------------------------------------------


def test_clip_tokenizer_matches_clip_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # CLIP's ids for this prompt, as every SD tokenizer gives them
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == 49407
    assert clip_tokenizer(pad_token="!").pad_token_id == 0


# -- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "family", "variant", "prediction", "size"),
    [
        ("sd1", "sd1", "base", "epsilon", 512),
        ("sd1-inpainting", "sd1", "inpainting", "epsilon", 512),
        ("sd2-v", "sd2", "base", "v_prediction", 768),
        ("sdxl", "sdxl", "base", "epsilon", 1024),
        ("sdxl-refiner", "sdxl", "refiner", "epsilon", 1024),
    ],
)
def test_family_is_detected_from_the_header_alone(
    models, monkeypatch, kind, family, variant, prediction, size
):
    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("detection read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    monkeypatch.setattr(torch, "load", no_tensor_reads)
    info = inspect_file(models[kind][0])
    assert (info.family, info.variant, info.prediction_type, info.default_size) == (
        family,
        variant,
        prediction,
        size,
    )
    assert info.prediction_source == "default"
    assert info.in_channels == (9 if variant == "inpainting" else 4)


def test_inpainting_variants_of_sd2_and_sdxl(models):
    for kind, family, prediction in (("sd2-v", "sd2", "epsilon"), ("sdxl", "sdxl", "epsilon")):
        shapes = read_safetensors_header(models[kind][0]).shapes
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        out_channels, _, k, _ = shapes[conv_in]
        info = detect_checkpoint({**shapes, conv_in: (out_channels, 9, k, k)})
        # SD 2.x inpainting (512-inpainting-ema) predicts noise, whatever the base rule is
        assert (info.family, info.variant, info.prediction_type, info.label) == (
            family,
            "inpainting",
            prediction,
            f"{family}-inpainting",
        )


def test_prediction_type_from_metadata_then_sidecar_then_default(models, tmp_path):
    sd2 = models["sd2-v"][0]
    shapes = read_safetensors_header(sd2).shapes
    v_yaml = tmp_path / "v.yaml"
    v_yaml.write_text('model:\n  params:\n    parameterization: "v"\n    image_size: 96\n')
    eps_yaml = tmp_path / "eps.yaml"
    eps_yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")

    def detect(metadata=None, sidecar=None):
        info = detect_checkpoint(shapes, metadata, sidecar=sidecar)
        return info.prediction_type, info.prediction_source, info.default_size

    assert detect() == ("v_prediction", "default", 768)  # SD 2.x: the 768 v-models
    assert detect(sidecar=eps_yaml) == ("epsilon", "sidecar", 512)  # A1111's v2-inference.yaml
    assert detect({"modelspec.prediction_type": "epsilon"}, v_yaml) == ("epsilon", "metadata", 512)
    assert detect({"modelspec.prediction_type": "v", "modelspec.resolution": "640x640"}) == (
        "v_prediction",
        "metadata",
        640,
    )
    sd1 = read_safetensors_header(models["sd1"][0]).shapes
    assert detect_checkpoint(sd1).prediction_type == "epsilon"
    assert detect_checkpoint(sd1, sidecar=v_yaml).prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="prediction type 'flow'"):
        detect({"modelspec.prediction_type": "flow"})


def test_sidecar_yaml_next_to_the_file_is_used(models, tmp_path):
    link = Path(shutil.copy(models["sd2-v"][0], tmp_path / "my-sd2-base.safetensors"))
    link.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    info = inspect_file(link)
    assert (info.prediction_type, info.prediction_source, info.label) == ("epsilon", "sidecar", "sd2")
    bundle = make_engine().models.get(str(link))
    assert bundle.scheduler_config["prediction_type"] == "epsilon"


def test_metadata_prediction_type_is_read_from_the_file(tmp_path):
    components = tiny_components("sd1")
    path = write_single_file(
        tmp_path / "vpred.safetensors", to_ldm("sd1", components), metadata={"modelspec.prediction_type": "v"}
    )
    info = inspect_file(path)
    assert (info.prediction_type, info.prediction_source, info.label) == ("v_prediction", "metadata", "sd1-v")


def _shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_unknown_layouts_say_what_was_found(models):
    sd1 = read_safetensors_header(models["sd1"][0]).shapes
    unet_only = {k: v for k, v in sd1.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ModelLoadError, match=r"no VAE .*model\.diffusion_model\.\* \(\d+\)"):
        detect_checkpoint(unet_only)
    no_text = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ModelLoadError, match=r"no text encoder.*first_stage_model\.\*"):
        detect_checkpoint(no_text)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(ModelLoadError, match="8 input channels"):
        detect_checkpoint({**sd1, conv_in: (32, 8, 3, 3)})
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion checkpoint: found lora_\*.*LoRA"):
        detect_checkpoint(lora)
    vae = {
        k.removeprefix("first_stage_model."): v for k, v in sd1.items() if k.startswith("first_stage_model.")
    }
    with pytest.raises(ModelLoadError, match="standalone VAE"):
        detect_checkpoint(vae)
    cross = {k: ((v[0], 96) if k.endswith("attn2.to_k.weight") else v) for k, v in sd1.items()}
    with pytest.raises(
        ModelLoadError, match="cross-attention takes 96 features but its text encoder gives 64"
    ):
        detect_checkpoint(cross)


# The published sizes of the real models (SD 1.5, SD 2.1-v, SDXL base 1.0, SDXL refiner 1.0)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
OPEN_CLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"
)
OPEN_CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
)
SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
FULL_SIZE = {
    "sd1": (dict(cross_attention_dim=768), [CLIP_L]),
    "sd2-v": (
        dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        [OPEN_CLIP_H],
    ),
    "sdxl": (
        dict(
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            **SDXL_BLOCKS,
        ),
        [CLIP_L, OPEN_CLIP_BIGG],
    ),
    "sdxl-refiner": (
        dict(
            block_out_channels=(384, 768, 1536, 1536),
            attention_head_dim=(6, 12, 24, 24),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=1280,
            transformer_layers_per_block=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560,
        ),
        [OPEN_CLIP_BIGG],
    ),
}


@pytest.mark.parametrize("kind", list(FULL_SIZE))
def test_full_size_configs_are_read_from_the_shapes(kind):
    """The real models' layouts (built without weights) give back their published configurations."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_kwargs, text_kwargs = FULL_SIZE[kind]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_kwargs)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        encoders = [
            (CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(
                CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **t)
            )
            for t in text_kwargs
        ]
    shapes = _shapes_of(to_ldm(kind, {"unet": unet, "vae": vae, "text_encoders": encoders}))
    configs = component_configs(shapes, detect_checkpoint(shapes))
    for key, value in unet.config.items():
        if key in unet_kwargs or key in (
            "block_out_channels",
            "layers_per_block",
            "in_channels",
            "out_channels",
        ):
            got = configs["unet"][key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == (
                list(value) if isinstance(value, (list, tuple)) else value
            ), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert list(np.atleast_1d(configs["vae"][key])) == list(np.atleast_1d(vae.config[key])), key
    for config, encoder in zip(configs["text_encoders"], encoders, strict=True):
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "hidden_act",
            "vocab_size",
        ):
            assert config[key] == getattr(encoder.config, key), key
        if isinstance(encoder, CLIPTextModelWithProjection):
            assert config["projection_dim"] == encoder.config.projection_dim


# -- conversion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd1-inpainting", "sd2-v", "sdxl"])
def test_every_converted_tensor_equals_the_original(models, kind):
    path, components = models[kind]
    bundle = load_single_file(path)
    assert_same_tensors(components["unet"], bundle.unet)
    assert_same_tensors(components["vae"], bundle.vae)
    assert len(bundle.text_encoders) == len(components["text_encoders"]) == len(bundle.tokenizers)
    for original, loaded in zip(components["text_encoders"], bundle.text_encoders, strict=True):
        assert type(loaded) is type(original)
        assert_same_tensors(original, loaded)
        for key in ("num_attention_heads", "hidden_act", "num_hidden_layers", "intermediate_size"):
            assert getattr(loaded.config, key) == getattr(original.config, key), key
    # (transformer depths are checked by the equal key sets above)
    for key in (
        "attention_head_dim",
        "use_linear_projection",
        "in_channels",
        "cross_attention_dim",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
    ):
        expected, got = components["unet"].config[key], bundle.unet.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(expected) if isinstance(expected, (list, tuple)) else expected
        ), key
    assert bundle.vae.config.scaling_factor == components["vae"].config.scaling_factor


def test_the_refiner_loads_and_matches_the_refiner_pipeline(models):
    """The SDXL refiner (one text encoder, aesthetic-score time ids) converts tensor for tensor and
    refines an image as diffusers' ``StableDiffusionXLImg2ImgPipeline`` with
    ``requires_aesthetics_score`` does."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    path, components = models["sdxl-refiner"]
    from webui.engine.files import load_state_dict

    bundle = convert_checkpoint(load_state_dict(path), inspect_file(path))
    assert bundle.config["variant"] == "refiner" and bundle.config["requires_aesthetics_score"] is True
    assert_same_tensors(components["unet"], bundle.unet)
    assert_same_tensors(components["text_encoders"][0], bundle.text_encoders[0])
    assert bundle.unet.config.addition_time_embed_dim == 8  # (pooled 64 + 5 time ids x 8) in the weights
    assert bundle.is_sdxl and bundle.time_id_count == 5

    engine = make_engine()
    init = random_image(4)
    got = engine.generate(
        GenerationRequest(
            **{
                **RUN,
                "model": str(path),
                "task": "img2img",
                "init_image": init,
                "strength": 0.5,
                "seed": 8,
                "width": 64,
                "height": 64,
            }
        )
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=components["vae"],
        text_encoder=None,
        text_encoder_2=components["text_encoders"][0],
        tokenizer=None,
        tokenizer_2=clip_tokenizer(pad_token="!", model_max_length=77),
        unet=components["unet"],
        scheduler=engine.schedulers.build("Euler", bundle.scheduler_config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        prompt=RUN["prompt"],
        negative_prompt=RUN["negative_prompt"],
        image=init,
        strength=0.5,
        num_inference_steps=RUN["steps"],
        guidance_scale=RUN["cfg_scale"],
        output_type="np",
        generator=torch.Generator().manual_seed(8),
    ).images[0]
    ours = got.images[0].pixels.permute(1, 2, 0).numpy()
    assert float(np.abs(ours - want).max()) < 1e-3
    assert float(ours.std()) > 0.01


@pytest.mark.parametrize(
    ("kind", "task"),
    [("sd1", "txt2img"), ("sd1-inpainting", "inpaint"), ("sd2-v", "txt2img"), ("sdxl", "txt2img")],
)
def test_generated_images_equal_the_original_components(models, kind, task):
    path, components = models[kind]
    extra = (
        dict(init_image=random_image(3, 32), mask=rect_mask(32), strength=1.0) if task == "inpaint" else {}
    )
    request = dict(RUN, task=task, batch_size=2, **extra)
    engine = make_engine()
    engine.models.add("reference", reference_bundle(kind, components))
    reference = engine.generate(GenerationRequest(**request, model="reference"))
    from_file = engine.generate(GenerationRequest(**request, model=str(path)))
    assert float(pixels(reference).std()) > 0.01
    assert torch.equal(pixels(from_file), pixels(reference))
    loaded = engine.models.get(str(path))
    expected = SCHEDULERS["sd2-v" if kind == "sd2-v" else kind.split("-")[0]]
    assert {k: loaded.scheduler_config.get(k) for k in expected} == expected
    assert f"Model: tiny-{kind}" in from_file.infotexts[0]


@pytest.mark.parametrize("kind", ["sd1", "sd1-inpainting", "sd2-v", "sdxl"])
def test_the_bundle_describes_the_file(models, kind):
    path, _ = models[kind]
    bundle = make_engine().models.get(str(path))
    family = kind.split("-")[0]
    assert isinstance(bundle, ModelBundle)
    assert (bundle.family, bundle.name, bundle.source) == (family, f"tiny-{kind}", str(path.resolve()))
    assert bundle.is_inpainting_unet == (kind == "sd1-inpainting")
    assert bundle.is_sdxl == (family == "sdxl")
    assert bundle.default_size == {"sd1": 512, "sd2": 768, "sdxl": 1024}[family]
    assert bundle.config.get("force_zeros_for_empty_prompt", False) == (family == "sdxl")
    assert bundle.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert not any(p.requires_grad for module in bundle.modules() for p in module.parameters())
    assert [t.pad_token_id for t in bundle.tokenizers] == {"sd1": [49407], "sd2": [0], "sdxl": [49407, 0]}[
        family
    ]


def test_half_precision_loading_casts_every_weight(models):
    bundle = load_single_file(models["sd1"][0], dtype=torch.float16)
    assert {p.dtype for module in bundle.modules() for p in module.parameters()} == {torch.float16}


# -- pickle checkpoints ---------------------------------------------------------------------------


class CodeOnLoad:
    """A pickle payload that would create a file when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoints_are_refused_without_the_opt_in(models, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": to_ldm("sd1", models["sd1"][1]), "global_step": 10}, ckpt)
    with pytest.raises(ModelLoadError) as error:
        make_engine().generate(GenerationRequest(**RUN, model=str(ckpt)))
    message = str(error.value)
    assert "tiny.ckpt is a pickle checkpoint" in message
    assert "arbitrary code" in message and "--allow-pickle" in message


def test_pickle_checkpoints_load_weights_only_with_the_opt_in(models, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": to_ldm("sd1", models["sd1"][1]), "global_step": 10}, ckpt)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    engine = make_engine(allow_pickle=True)
    from_pickle = engine.generate(GenerationRequest(**RUN, model=str(ckpt)))
    from_safetensors = engine.generate(GenerationRequest(**RUN, model=str(models["sd1"][0])))
    assert calls == [True]  # read once, weights only
    assert torch.equal(pixels(from_pickle), pixels(from_safetensors))


def test_a_pickle_with_code_is_refused_even_with_the_opt_in(tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": CodeOnLoad(marker)}, ckpt)
    with pytest.raises(ModelLoadError, match="cannot be read as plain weights"):
        make_engine(allow_pickle=True).models.get(str(ckpt))
    assert not marker.exists()


def test_allow_pickle_flag_reaches_the_engine():
    from webui.cli import _engine, build_parser

    for argv, expected in (
        (["models"], False),
        (["--allow-pickle", "models"], True),
        (["models", "--allow-pickle"], True),
    ):
        args = build_parser().parse_args(argv)
        assert args.allow_pickle is expected
        args.device = "cpu"
        assert _engine(args).models.allow_pickle is expected


# -- malformed safetensors ------------------------------------------------------------------------


def _small_file(path: Path) -> bytes:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, str(path))
    return path.read_bytes()


def _with_header(data: bytes, header: dict) -> bytes:
    old_len = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + old_len :]


def _header(data: bytes) -> dict:
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tiny", "only 5 bytes long"),
        ("huge_header", "header claims 1099511627776 bytes"),
        ("not_json", "header is not JSON"),
        ("not_object", "header is not a JSON object"),
        ("outside", "tensor 'b' ends at byte 4096"),
        ("truncated", "is truncated or damaged"),
        ("wrong_size", "needs 24 bytes but its data_offsets span 20"),
        ("bad_dtype", "unknown dtype 'F128'"),
    ],
)
def test_malformed_safetensors_files_are_refused(tmp_path, damage, message):
    path = tmp_path / f"{damage}.safetensors"
    data = _small_file(path)
    header = _header(data)
    if damage == "tiny":
        data = b"\x01\x02\x03\x04\x05"
    elif damage == "huge_header":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    elif damage == "not_json":
        raw = b"{this is not json" + b" " * 20
        data = struct.pack("<Q", len(raw)) + raw + b"\x00" * 40
    elif damage == "not_object":
        data = _with_header(data, [1, 2, 3])
    elif damage == "outside":
        header["b"]["data_offsets"] = [4080, 4096]
        data = _with_header(data, header)
    elif damage == "truncated":
        data = data[:-7]
    elif damage == "wrong_size":
        header["a"]["data_offsets"][1] -= 4
        data = _with_header(data, header)
    elif damage == "bad_dtype":
        header["a"]["dtype"] = "F128"
        data = _with_header(data, header)
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=message):
        read_safetensors_header(path)
    with pytest.raises(ModelLoadError, match=message):
        make_engine().generate(GenerationRequest(**RUN, model=str(path)))


def test_a_valid_small_file_passes_the_checks(tmp_path):
    path = tmp_path / "ok.safetensors"
    _small_file(path)
    header = read_safetensors_header(path)
    assert header.shapes == {"a": (2, 3), "b": (4,)}
    with pytest.raises(
        ModelLoadError, match=r"not a Stable Diffusion checkpoint: found a\.\* \(1\), b\.\* \(1\)"
    ):
        make_engine().models.get(str(path))


# -- ControlNets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_controlnet(models, tmp_path_factory):
    controlnet = make_controlnet(models["sd1"][1]["unet"], seed=5)
    path = tmp_path_factory.mktemp("cn") / "control_v11p_sd15_seg.safetensors"
    return write_single_file(path, controlnet_to_ldm(controlnet.state_dict())), controlnet


def test_single_file_controlnet_round_trip(models, seg_controlnet):
    path, original = seg_controlnet
    engine = make_engine()
    loaded = engine.models.get_controlnet(str(path))
    assert_same_tensors(original, loaded)
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32]
    assert loaded.seg_palette == ADE20K
    request = dict(RUN, task="seg2img", seg_map=seg_map(32), control_scale=0.8)
    engine.models.add("reference", reference_bundle("sd1", models["sd1"][1]))
    engine.models.add("reference-seg", original, kind="controlnet")
    reference = engine.generate(GenerationRequest(**request, model="reference", controlnet="reference-seg"))
    from_files = engine.generate(
        GenerationRequest(**request, model=str(models["sd1"][0]), controlnet=str(path))
    )
    without = engine.generate(GenerationRequest(**RUN, model=str(models["sd1"][0])))
    assert torch.equal(pixels(from_files), pixels(reference))
    assert not torch.equal(pixels(from_files), pixels(without))  # the ControlNet acted


def test_controlnet_without_prefix_and_of_sd2(models, seg_controlnet, tmp_path):
    _, original = seg_controlnet
    bare = write_single_file(
        tmp_path / "bare.safetensors", controlnet_to_ldm(original.state_dict(), prefix="")
    )
    assert_same_tensors(original, make_engine().models.get_controlnet(str(bare)))
    sd2 = make_controlnet(models["sd2-v"][1]["unet"], seed=6)  # linear projections: the SD 2.x rule
    converted = convert_controlnet(controlnet_to_ldm(sd2.state_dict()))
    assert_same_tensors(sd2, converted)
    assert list(converted.config.attention_head_dim) == [1, 2]


def test_controlnet_and_checkpoint_files_are_not_mixed_up(models, seg_controlnet):
    engine = make_engine()
    with pytest.raises(ModelLoadError, match="looks like a ControlNet"):
        engine.models.get(str(seg_controlnet[0]))
    with pytest.raises(ModelLoadError, match="not a ControlNet in the original layout"):
        engine.models.get_controlnet(str(models["sd1"][0]))


def test_controlnet_palette_sidecar_wins(seg_controlnet, tmp_path):
    link = Path(shutil.copy(seg_controlnet[0], tmp_path / "my_seg.safetensors"))
    (tmp_path / "my_seg.palette.json").write_text(
        json.dumps({"name": "two", "classes": ["sky", "sea"], "colors": [[0, 0, 255], [0, 128, 255]]})
    )
    palette = make_engine().models.get_controlnet(str(link)).seg_palette
    assert palette.classes == ("sky", "sea")
