"""Tiny random model components for tests: no downloads, built in code, small enough for the CPU.

The sizes follow the dummy components of diffusers' own pipeline tests, so results can be compared
with the diffusers pipelines built from the same objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from webui.engine.bundle import ModelBundle
from webui.testing import byte_level_alphabet

CLIP_WORDS = ("the", "cat", "dog", "a", "photo", "of", "red", "blue", "sat", "on", "mat", "painting")
BERT_WORDS = ("the", "cat", "dog", "a", "photo", "of", "red", "blue", "sat", "on", "mat", ",", ".", "##s")


def _word_merges(word: str) -> list[str]:
    """Left-to-right merges that build ``word</w>`` from its characters (none for one letter)."""
    if len(word) < 2:
        return []
    merges = []
    for i in range(1, len(word) - 1):
        merges.append(f"{word[:i]} {word[i]}")
    merges.append(f"{word[:-1]} {word[-1]}</w>")
    return merges


def make_clip_tokenizer(
    path: str | Path,
    *,
    pad_token: str = "<|endoftext|>",
    model_max_length: int = 77,
    words: tuple[str, ...] = CLIP_WORDS,
) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer written to ``path`` (vocab.json + merges.txt): byte characters, their
    word-final forms, whole-word merges for ``words``, then ``<|startoftext|>`` and ``<|endoftext|>``
    (the two highest ids, as in CLIP). Every id is below 1000.

    ``pad_token="!"`` gives the padding of SD 2.x and SDXL's second tokenizer.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        for merge in _word_merges(word):
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) < 1000
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(path), pad_token=pad_token, model_max_length=model_max_length)


def clip_text_config(projection: bool = False) -> CLIPTextConfig:
    """The text-encoder configuration of diffusers' SD / SDXL pipeline tests."""
    kwargs: dict[str, Any] = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
    )
    if projection:
        kwargs.update(hidden_act="gelu", projection_dim=32)
    return CLIPTextConfig(**kwargs)


def make_text_encoder(seed: int = 0, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny random CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection``), in eval mode."""
    torch.manual_seed(seed)
    config = clip_text_config(projection)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def make_bert_tokenizer(path: str | Path, *, model_max_length: int = 32) -> BertTokenizer:
    """A real WordPiece tokenizer from a small vocab.txt written to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(path), model_max_length=model_max_length)


def make_bert_encoder(seed: int = 0, *, vocab_size: int = 32, max_position_embeddings: int = 32) -> BertModel:
    """A tiny random BERT encoder (MiniLM-style text encoder), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=max_position_embeddings,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def make_unet(
    seed: int = 0,
    *,
    sdxl: bool = False,
    in_channels: int = 4,
    time_cond_proj_dim: int | None = None,
    cross_attention_first: bool = False,
) -> UNet2DConditionModel:
    """The tiny UNet of diffusers' SD (or SDXL) pipeline tests; ``in_channels=9`` for inpainting,
    ``time_cond_proj_dim`` for a guidance-embedding UNet (a distilled latent consistency model),
    ``cross_attention_first`` for SD 1.x/2.x's block order (cross-attention in the first down
    block, the last up block)."""
    torch.manual_seed(seed)
    if sdxl:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
            cross_attention_dim=64,
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")
            if cross_attention_first
            else ("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
            if cross_attention_first
            else ("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            time_cond_proj_dim=time_cond_proj_dim,
        )
    return unet.eval()


def make_vae(seed: int = 0) -> AutoencoderKL:
    """The tiny VAE of diffusers' SD pipeline tests (scale factor 2, 4 latent channels)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    return vae.eval()


def make_scheduler() -> DDIMScheduler:
    """The scheduler of diffusers' SD pipeline tests."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_sd_components(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """The components of a tiny ``StableDiffusionPipeline`` (tokenizer files go under ``path``)."""
    return {
        "unet": make_unet(seed),
        "scheduler": make_scheduler(),
        "vae": make_vae(seed),
        "text_encoder": make_text_encoder(seed),
        "tokenizer": make_clip_tokenizer(Path(path) / "tokenizer"),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def make_sdxl_components(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """The components of a tiny ``StableDiffusionXLPipeline`` (tokenizer files go under ``path``)."""
    return {
        "unet": make_unet(seed, sdxl=True),
        "scheduler": make_scheduler(),
        "vae": make_vae(seed),
        "text_encoder": make_text_encoder(seed),
        "text_encoder_2": make_text_encoder(seed + 1, projection=True),
        "tokenizer": make_clip_tokenizer(Path(path) / "tokenizer"),
        "tokenizer_2": make_clip_tokenizer(Path(path) / "tokenizer_2", pad_token="!"),
        "image_encoder": None,
        "feature_extractor": None,
    }


def bundle_from_components(
    components: dict[str, Any], *, family: str | None = None, config: dict[str, Any] | None = None
) -> ModelBundle:
    """A :class:`ModelBundle` over SD or SDXL pipeline components."""
    sdxl = "text_encoder_2" in components
    encoders = [components["text_encoder"]] + ([components["text_encoder_2"]] if sdxl else [])
    tokenizers = [components["tokenizer"]] + ([components["tokenizer_2"]] if sdxl else [])
    return ModelBundle(
        name="tiny-sdxl" if sdxl else "tiny-sd",
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config=dict(components["scheduler"].config),
        family=family or ("sdxl" if sdxl else "sd1"),
        config=dict(config or {}),
    )


def stub_unet(*, sdxl: bool = False) -> SimpleNamespace:
    """A stand-in UNet with only the config the bundle's family checks read (text-only tests)."""
    return SimpleNamespace(
        config=SimpleNamespace(
            addition_embed_type="text_time" if sdxl else None,
            in_channels=4,
            sample_size=32,
        )
    )


def text_bundle(
    text_encoders: list[Any],
    tokenizers: list[Any],
    *,
    family: str = "sd1",
    config: dict[str, Any] | None = None,
) -> ModelBundle:
    """A bundle with only text components (stub UNet, no VAE) for prompt-encoding tests."""
    return ModelBundle(
        name=f"tiny-{family}",
        unet=stub_unet(sdxl=family == "sdxl"),
        vae=None,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config={},
        family=family,
        config=dict(config or {}),
    )
