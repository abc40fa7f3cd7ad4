"""Prompt encoding: parity with the diffusers pipelines, long prompts, BREAK, weights, BERT encoders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny import (
    bundle_from_components,
    make_bert_encoder,
    make_bert_tokenizer,
    make_clip_tokenizer,
    make_sd_components,
    make_sdxl_components,
    make_text_encoder,
    text_bundle,
)

from webui.engine.bundle import ModelBundle
from webui.engine.text import PromptEmbeds, chunk_prompt, encode_prompts
from webui.errors import InvalidRequestError, ModelLoadError

ATOL = 1e-5
CPU = torch.device("cpu")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_sd_components(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_bundle(sd: dict[str, Any]) -> ModelBundle:
    return bundle_from_components(sd)


@pytest.fixture(scope="module")
def sd_pipe(sd: dict[str, Any]) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**sd, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_sdxl_components(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl: dict[str, Any]) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(**sdxl)


class _TextModelView:
    """A CLIPTextModel seen through the ``.text_model.final_layer_norm`` path that diffusers' SD
    clip-skip code reads; transformers 5 keeps the norm on the model itself."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.config = encoder.config
        self.dtype = encoder.dtype
        self.text_model = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._encoder(*args, **kwargs)


def diffusers_sd(
    sd: dict[str, Any], prompt: str, negative: str | None, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``StableDiffusionPipeline.encode_prompt`` over the given components (clip skip included)."""
    encoder = sd["text_encoder"]
    if not hasattr(encoder, "text_model"):
        encoder = _TextModelView(encoder)
    owner = SimpleNamespace(tokenizer=sd["tokenizer"], text_encoder=encoder, unet=sd["unet"])
    with torch.no_grad():
        return StableDiffusionPipeline.encode_prompt(
            owner, prompt, CPU, 1, True, negative, clip_skip=clip_skip
        )


def encode_one(
    bundle: ModelBundle, prompt: str, negative: str = "", **kwargs: Any
) -> tuple[PromptEmbeds, PromptEmbeds]:
    return encode_prompts(bundle, [prompt], [negative], **kwargs)


# --------------------------------------------------------------------------- SD 1.x parity


@pytest.mark.parametrize("prompt", ["a photo of a cat", "red dog sat on the mat, painting", ""])
def test_sd_matches_diffusers_pipeline(
    sd_pipe: StableDiffusionPipeline, sd_bundle: ModelBundle, prompt: str
) -> None:
    with torch.no_grad():
        ref, ref_neg = sd_pipe.encode_prompt(prompt, CPU, 1, True, "blue dog")
    pos, neg = encode_one(sd_bundle, prompt, "blue dog")
    assert pos.embeds.shape == ref.shape == (1, 77, 32)
    assert pos.pooled is None and neg.pooled is None
    assert max_diff(pos.embeds, ref) < ATOL
    assert max_diff(neg.embeds, ref_neg) < ATOL


def test_sd_empty_negative_matches_diffusers(
    sd_pipe: StableDiffusionPipeline, sd_bundle: ModelBundle
) -> None:
    with torch.no_grad():
        _, ref_neg = sd_pipe.encode_prompt("a cat", CPU, 1, True, None)
    _, neg = encode_one(sd_bundle, "a cat", "")
    assert max_diff(neg.embeds, ref_neg) < ATOL


def test_sd_unweighted_is_bitwise_equal_to_diffusers(
    sd_pipe: StableDiffusionPipeline, sd_bundle: ModelBundle
) -> None:
    with torch.no_grad():
        ref, _ = sd_pipe.encode_prompt("a photo of a cat", CPU, 1, True, "")
    pos, _ = encode_one(sd_bundle, "a photo of (a:1) cat")
    assert torch.equal(pos.embeds, ref)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_sd_clip_skip_matches_diffusers(sd: dict[str, Any], sd_bundle: ModelBundle, clip_skip: int) -> None:
    # A1111's clip skip k is diffusers' clip_skip k - 1 (None for k = 1).
    ref, ref_neg = diffusers_sd(sd, "a photo of a cat", "red mat", None if clip_skip == 1 else clip_skip - 1)
    pos, _ = encode_one(sd_bundle, "a photo of a cat", "red mat", clip_skip=clip_skip)
    assert max_diff(pos.embeds, ref) < ATOL
    if clip_skip > 1:
        plain, _ = encode_one(sd_bundle, "a photo of a cat")
        assert max_diff(pos.embeds, plain.embeds) > 1e-3


def test_sd_attention_mask_when_configured(tmp_path: Path) -> None:
    encoder = make_text_encoder(3)
    encoder.config.use_attention_mask = True
    components = {"tokenizer": make_clip_tokenizer(tmp_path / "tok"), "text_encoder": encoder, "unet": None}
    ref, ref_neg = diffusers_sd(components, "a cat", "the dog")
    bundle = text_bundle([encoder], [components["tokenizer"]])
    pos, neg = encode_one(bundle, "a cat", "the dog")
    assert max_diff(pos.embeds, ref) < ATOL
    assert max_diff(neg.embeds, ref_neg) < ATOL


# --------------------------------------------------------------------------- SDXL parity


def diffusers_sdxl(pipe: StableDiffusionXLPipeline, prompt: str, negative: str | None, **kwargs: Any) -> Any:
    with torch.no_grad():
        return pipe.encode_prompt(
            prompt,
            device=CPU,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            **kwargs,
        )


@pytest.mark.parametrize("prompt", ["a photo of a cat", "blue painting, red dog"])
def test_sdxl_matches_diffusers_pipeline(
    sdxl: dict[str, Any], sdxl_pipe: StableDiffusionXLPipeline, prompt: str
) -> None:
    bundle = bundle_from_components(sdxl)
    assert bundle.is_sdxl
    ref, ref_neg, ref_pooled, ref_neg_pooled = diffusers_sdxl(sdxl_pipe, prompt, "the mat")
    pos, neg = encode_one(bundle, prompt, "the mat")
    assert pos.embeds.shape == (1, 77, 64) and pos.pooled.shape == (1, 32)
    assert max_diff(pos.embeds, ref) < ATOL
    assert max_diff(neg.embeds, ref_neg) < ATOL
    assert max_diff(pos.pooled, ref_pooled) < ATOL
    assert max_diff(neg.pooled, ref_neg_pooled) < ATOL


def test_sdxl_clip_skip_matches_diffusers(sdxl: dict[str, Any], sdxl_pipe: StableDiffusionXLPipeline) -> None:
    bundle = bundle_from_components(sdxl)
    ref, _, ref_pooled, _ = diffusers_sdxl(sdxl_pipe, "a photo of a cat", "the mat", clip_skip=1)
    pos, _ = encode_one(bundle, "a photo of a cat", "the mat", clip_skip=2)
    assert max_diff(pos.embeds, ref) < ATOL
    assert max_diff(pos.pooled, ref_pooled) < ATOL


def test_sdxl_empty_negative_is_zeros_when_forced(
    sdxl: dict[str, Any], sdxl_pipe: StableDiffusionXLPipeline
) -> None:
    ref, ref_neg, ref_pooled, ref_neg_pooled = diffusers_sdxl(sdxl_pipe, "a photo of a cat", None)
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    bundle = bundle_from_components(sdxl, config={"force_zeros_for_empty_prompt": True})
    pos, neg = encode_one(bundle, "a photo of a cat", "")
    assert max_diff(pos.embeds, ref) < ATOL and max_diff(pos.pooled, ref_pooled) < ATOL
    assert torch.count_nonzero(neg.embeds) == 0 and torch.count_nonzero(neg.pooled) == 0
    assert neg.embeds.shape == ref_neg.shape and neg.pooled.shape == ref_neg_pooled.shape


def test_sdxl_empty_negative_is_encoded_when_not_forced(
    sdxl: dict[str, Any], sdxl_pipe: StableDiffusionXLPipeline
) -> None:
    _, ref_neg, _, ref_neg_pooled = diffusers_sdxl(sdxl_pipe, "a photo of a cat", "")
    pos, neg = encode_one(bundle_from_components(sdxl), "a photo of a cat", "")
    assert max_diff(neg.embeds, ref_neg) < ATOL
    assert max_diff(neg.pooled, ref_neg_pooled) < ATOL
    assert torch.count_nonzero(neg.embeds) > 0


def test_sdxl_long_prompt_pooled_comes_from_first_chunk(sdxl: dict[str, Any]) -> None:
    bundle = bundle_from_components(sdxl)
    short, _ = encode_one(bundle, "a photo of a cat")
    long, neg = encode_one(bundle, "a photo of a cat BREAK red dog")
    assert long.embeds.shape == neg.embeds.shape == (1, 154, 64)
    assert max_diff(long.pooled, short.pooled) < ATOL
    assert max_diff(long.embeds[:, :77], short.embeds) < ATOL


# --------------------------------------------------------------------------- chunking


def test_chunk_prompt_splits_at_75_tokens(sd: dict[str, Any]) -> None:
    tokenizer = sd["tokenizer"]
    chunks = chunk_prompt(tokenizer, "cat " * 200, 75)
    assert [len(c.tokens) for c in chunks] == [75, 75, 50]
    assert (
        chunk_prompt(tokenizer, "cat " * 75 + "BREAK dog", 75)[1].tokens
        == tokenizer("dog", add_special_tokens=False)["input_ids"]
    )
    assert len(chunk_prompt(tokenizer, "cat " * 75 + "BREAK", 75)) == 1
    assert [len(c.tokens) for c in chunk_prompt(tokenizer, "", 75)] == [0]
    assert [len(c.tokens) for c in chunk_prompt(tokenizer, "BREAK cat", 75)] == [0, 1]


def test_long_prompt_is_three_chunks(sd_bundle: ModelBundle) -> None:
    words = ["cat", "dog", "red", "mat"] * 50  # 200 single-token words
    pos, neg = encode_one(sd_bundle, " ".join(words), "blue")
    assert pos.embeds.shape == (1, 231, 32)
    assert neg.embeds.shape == pos.embeds.shape
    first, _ = encode_one(sd_bundle, " ".join(words[:75]))
    second, _ = encode_one(sd_bundle, " ".join(words[75:150]))
    third, _ = encode_one(sd_bundle, " ".join(words[150:]))
    assert max_diff(pos.embeds[:, :77], first.embeds) < ATOL
    assert max_diff(pos.embeds[:, 77:154], second.embeds) < ATOL
    assert max_diff(pos.embeds[:, 154:], third.embeds) < ATOL
    # the negative is its own prompt followed by empty chunks
    blue, _ = encode_one(sd_bundle, "blue")
    empty, _ = encode_one(sd_bundle, "")
    assert max_diff(neg.embeds[:, :77], blue.embeds) < ATOL
    assert max_diff(neg.embeds[:, 77:154], empty.embeds) < ATOL
    assert max_diff(neg.embeds[:, 154:], empty.embeds) < ATOL


def test_long_negative_pads_the_positive(sd_bundle: ModelBundle) -> None:
    pos, neg = encode_one(sd_bundle, "cat", "dog " * 80)
    assert pos.embeds.shape == neg.embeds.shape == (1, 154, 32)


def test_batch_pads_every_prompt_to_the_longest(sd_bundle: ModelBundle) -> None:
    pos, neg = encode_prompts(sd_bundle, ["cat " * 100, "dog"], ["", "red"])
    assert pos.embeds.shape == neg.embeds.shape == (2, 154, 32)
    dog, red = encode_one(sd_bundle, "dog", "red")
    assert max_diff(pos.embeds[1:, :77], dog.embeds) < ATOL
    assert max_diff(neg.embeds[1:, :77], red.embeds) < ATOL


def test_break_starts_a_new_chunk(sd_bundle: ModelBundle) -> None:
    pos, neg = encode_one(sd_bundle, "a photo of a cat BREAK red dog")
    assert pos.embeds.shape == neg.embeds.shape == (1, 154, 32)
    first, _ = encode_one(sd_bundle, "a photo of a cat")
    second, _ = encode_one(sd_bundle, "red dog")
    assert max_diff(pos.embeds[:, :77], first.embeds) < ATOL
    assert max_diff(pos.embeds[:, 77:], second.embeds) < ATOL


# --------------------------------------------------------------------------- weights


def test_weights_scale_tokens_and_keep_the_mean(sd: dict[str, Any], sd_bundle: ModelBundle) -> None:
    plain, _ = encode_one(sd_bundle, "a red cat sat")
    weighted, _ = encode_one(sd_bundle, "a red (cat:1.5) sat")
    assert max_diff(plain.embeds, weighted.embeds) > 1e-3
    assert float(weighted.embeds.mean()) == pytest.approx(float(plain.embeds.mean()), abs=1e-6)
    # token 0 is BOS, then "a", "red", "cat": the cat position gets 1.5x before the mean rescale
    w = torch.ones(77)
    w[3] = 1.5
    z = plain.embeds * w[None, :, None]
    # the engine keeps the scale when the weighted mean is exactly zero (a tiny random encoder's
    # embeddings can average to 0.0), rather than dividing by it
    ratio = plain.embeds.mean() / z.mean() if float(z.mean()) != 0.0 else 1.0
    expected = z * ratio
    assert max_diff(weighted.embeds, expected) < ATOL


def test_weights_apply_per_chunk(sd_bundle: ModelBundle) -> None:
    plain, _ = encode_one(sd_bundle, "a red cat BREAK a dog")
    weighted, _ = encode_one(sd_bundle, "a red cat BREAK a [dog]")
    assert torch.equal(plain.embeds[:, :77], weighted.embeds[:, :77])
    assert max_diff(plain.embeds[:, 77:], weighted.embeds[:, 77:]) > 1e-4
    assert float(weighted.embeds[:, 77:].mean()) == pytest.approx(
        float(plain.embeds[:, 77:].mean()), abs=1e-6
    )


def test_weighted_sdxl_keeps_pooled(sdxl: dict[str, Any]) -> None:
    bundle = bundle_from_components(sdxl)
    plain, _ = encode_one(bundle, "a red cat")
    weighted, _ = encode_one(bundle, "a red (cat:1.4)")
    assert max_diff(plain.embeds, weighted.embeds) > 1e-3
    assert torch.equal(plain.pooled, weighted.pooled)


# --------------------------------------------------------------------------- options and errors


def test_dtype_and_device(sd_bundle: ModelBundle) -> None:
    pos, neg = encode_one(sd_bundle, "cat", "dog", dtype=torch.float64, device="cpu")
    assert pos.embeds.dtype == neg.embeds.dtype == torch.float64
    assert pos.embeds.device == CPU
    assert not pos.embeds.requires_grad


def test_bad_arguments(sd_bundle: ModelBundle) -> None:
    with pytest.raises(InvalidRequestError):
        encode_prompts(sd_bundle, ["a", "b"], [""])
    with pytest.raises(InvalidRequestError):
        encode_prompts(sd_bundle, [], [])
    with pytest.raises(InvalidRequestError):
        encode_one(sd_bundle, "cat", clip_skip=0)
    with pytest.raises(InvalidRequestError):
        encode_one(sd_bundle, "cat", clip_skip=6)


# --------------------------------------------------------------------------- BERT-style encoder


@pytest.fixture(scope="module")
def bert_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    tokenizer = make_bert_tokenizer(tmp_path_factory.mktemp("bert"), model_max_length=32)
    encoder = make_bert_encoder(0, vocab_size=len(tokenizer), max_position_embeddings=40)
    return text_bundle([encoder], [tokenizer], family="latent-studio")


def test_bert_encoder_uses_cls_sep_and_masks_padding(bert_bundle: ModelBundle) -> None:
    tokenizer, encoder = bert_bundle.tokenizers[0], bert_bundle.text_encoders[0]
    pos, neg = encode_one(bert_bundle, "the cat sat on the mats.", "dog")
    assert pos.embeds.shape == neg.embeds.shape == (1, 32, 32)  # window = min(32, 40)
    assert pos.pooled is None
    ids = tokenizer("the cat sat on the mats.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    with torch.no_grad():
        unpadded = encoder(input_ids=torch.tensor([ids])).last_hidden_state
    # real tokens (specials included) are unaffected by the padding after them
    assert max_diff(pos.embeds[:, : len(ids)], unpadded) < ATOL


def test_bert_long_prompt_chunks_at_window(bert_bundle: ModelBundle) -> None:
    tokenizer = bert_bundle.tokenizers[0]
    text = "red cat " * 20  # 40 tokens -> chunks of 30 + 10
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 40
    pos, neg = encode_one(bert_bundle, text, "")
    assert pos.embeds.shape == neg.embeds.shape == (1, 64, 32)
    first, _ = encode_one(bert_bundle, "red cat " * 15)
    assert max_diff(pos.embeds[:, :32], first.embeds) < ATOL
    weighted, _ = encode_one(bert_bundle, "(red:1.3) cat")
    plain, _ = encode_one(bert_bundle, "red cat")
    assert max_diff(weighted.embeds, plain.embeds) > 1e-3
    assert float(weighted.embeds.mean()) == pytest.approx(float(plain.embeds.mean()), abs=1e-6)


def test_bert_hidden_states_side_by_side(bert_bundle: ModelBundle) -> None:
    """``text_conditioning.hidden_states`` in the model's index concatenates those layers' states."""
    tokenizer, encoder = bert_bundle.tokenizers[0], bert_bundle.text_encoders[0]
    wide = text_bundle([encoder], [tokenizer], family="latent-studio")
    wide.config["text_conditioning"] = {"hidden_states": [-1, 0]}
    pos, neg = encode_one(wide, "the red cat", "dog")
    assert pos.embeds.shape == neg.embeds.shape == (1, 32, 64)
    plain, _ = encode_one(bert_bundle, "the red cat", "dog")
    assert max_diff(pos.embeds[..., :32], plain.embeds) < ATOL  # the last layer first, as before
    ids = tokenizer("the red cat")["input_ids"]
    with torch.no_grad():
        embedded = encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[0]
    assert max_diff(pos.embeds[:, : len(ids), 32:], embedded) < ATOL  # then the embedding layer's output


@pytest.mark.parametrize("layers", [[], [0, 9], "last", [0.5]])
def test_bert_bad_hidden_states_setting_is_a_clear_error(bert_bundle: ModelBundle, layers: Any) -> None:
    wide = text_bundle(bert_bundle.text_encoders, bert_bundle.tokenizers, family="latent-studio")
    wide.config["text_conditioning"] = {"hidden_states": layers}
    with pytest.raises(ModelLoadError, match="hidden_states"):
        encode_one(wide, "the red cat")
