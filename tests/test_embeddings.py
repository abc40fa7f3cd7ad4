"""Textual-inversion embeddings: the name in a prompt becomes the embedding's vectors, as in A1111."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from components import bundle_from, sd_components
from safetensors.torch import save_file
from tiny import make_clip_tokenizer, make_text_encoder, text_bundle

from webui.engine.bundle import ModelBundle
from webui.engine.embeddings import EmbeddingLibrary, parse_embedding, read_embedding
from webui.engine.pipeline import Engine
from webui.engine.text import chunk_prompt, encode_prompts
from webui.errors import InvalidRequestError, ModelLoadError
from webui.metadata import parse_infotext
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

DIM = 32  # the tiny CLIP encoders' width


def vectors(n: int, seed: int, dim: int = DIM) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def write(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def encoder_input(text_encoder: Any) -> tuple[list[torch.Tensor], Any]:
    """Record the input of CLIP's first layer: token embeddings plus position embeddings (a hook of
    the test's own, on the module around the token-embedding layer, so it sees the final vectors)."""
    token_layer = text_encoder.get_input_embeddings()
    embeddings = next(m for m in text_encoder.modules() if getattr(m, "token_embedding", None) is token_layer)
    seen: list[torch.Tensor] = []
    handle = embeddings.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    return seen, handle


def with_positions(text_encoder: Any, vectors: torch.Tensor, start: int) -> torch.Tensor:
    """``vectors`` as CLIP's first layer gets them at positions ``start...`` (plus position embeddings)."""
    token_layer = text_encoder.get_input_embeddings()
    embeddings = next(m for m in text_encoder.modules() if getattr(m, "token_embedding", None) is token_layer)
    return vectors + embeddings.position_embedding.weight[start : start + len(vectors)].detach()


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    tokenizer = make_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return text_bundle([make_text_encoder(0)], [tokenizer])


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    write(folder, "inkstyle", {"emb_params": vectors(2, 1)})
    write(folder / "sub", "tiny", {"string_to_param.*": vectors(1, 2)})
    write(folder, "narrow", {"emb_params": vectors(2, 3, dim=16)})  # made for another model
    return folder


@pytest.fixture
def library(library_dir: Path) -> EmbeddingLibrary:
    return EmbeddingLibrary.from_folder(library_dir)


def test_the_vectors_take_the_place_of_the_name(sd: ModelBundle, library: EmbeddingLibrary) -> None:
    encoder, tokenizer = sd.text_encoders[0], sd.tokenizers[0]
    emb = library.get("inkstyle").vectors[0]
    seen, handle = encoder_input(encoder)
    try:
        positive, _ = encode_prompts(sd, ["a inkstyle cat"], [""], embeddings=library)
    finally:
        handle.remove()
    assert torch.equal(seen[0][0, 2:4], with_positions(encoder, emb, 2))  # after the start token and "a"

    # the same prompt through an encoder whose vocabulary was extended by hand with the vectors
    manual = copy.deepcopy(encoder)
    spare = [10, 11]  # two byte tokens the prompt does not use
    with torch.no_grad():
        manual.get_input_embeddings().weight[spare] = emb
    (a,), (cat,) = tokenizer(["a", "cat"], add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, a, *spare, cat, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    with torch.no_grad():
        expected = manual(torch.tensor([ids])).last_hidden_state
    torch.testing.assert_close(positive.embeds, expected, rtol=0, atol=1e-6)


def test_an_embedding_counts_as_its_vectors_when_chunking(sd: ModelBundle, library: EmbeddingLibrary) -> None:
    tokenizer = sd.tokenizers[0]
    matcher = library.matcher(tokenizer, [DIM], 0)
    fits = chunk_prompt(tokenizer, "cat " * 73 + "inkstyle", 75, matcher)
    assert [len(c.tokens) for c in fits] == [75]
    assert [offset for offset, _ in fits[0].fixes] == [73]
    spills = chunk_prompt(tokenizer, "cat " * 74 + "inkstyle", 75, matcher)
    assert [len(c.tokens) for c in spills] == [74, 2]  # it does not fit: it starts the next chunk
    assert spills[0].fixes == [] and [offset for offset, _ in spills[1].fixes] == [0]


def test_emphasis_weights_the_vectors(sd: ModelBundle, library: EmbeddingLibrary) -> None:
    tokenizer = sd.tokenizers[0]
    (chunk,) = chunk_prompt(tokenizer, "(inkstyle:1.5) cat", 75, library.matcher(tokenizer, [DIM], 0))
    assert chunk.weights == [1.5, 1.5, 1.0]
    weighted, _ = encode_prompts(sd, ["(inkstyle:1.5) cat"], [""], embeddings=library)
    plain, _ = encode_prompts(sd, ["inkstyle cat"], [""], embeddings=library)
    assert float((weighted.embeds - plain.embeds).abs().max()) > 1e-4


def test_negative_prompts_use_embeddings_and_the_hashes_are_recorded(
    sd: ModelBundle, library: EmbeddingLibrary, library_dir: Path
) -> None:
    _, negative = encode_prompts(sd, ["a cat"], ["tiny, blurry"], embeddings=library)
    _, as_words = encode_prompts(sd, ["a cat"], ["tiny, blurry"])
    assert float((negative.embeds - as_words.embeds).abs().max()) > 1e-4
    digest = hashlib.sha256((library_dir / "sub" / "tiny.safetensors").read_bytes()).hexdigest()[:12]
    assert library.metadata() == {"TI hashes": f"tiny: {digest}"}


def test_nothing_is_left_on_the_tokenizer_or_the_encoder(sd: ModelBundle, library: EmbeddingLibrary) -> None:
    encoder, tokenizer = sd.text_encoders[0], sd.tokenizers[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    vocabulary = len(tokenizer)
    as_words, _ = encode_prompts(sd, ["a inkstyle cat"], [""])
    with_embedding, _ = encode_prompts(sd, ["a inkstyle cat"], [""], embeddings=library)
    assert not torch.equal(as_words.embeds, with_embedding.embeds)
    assert len(encoder.get_input_embeddings()._forward_hooks) == 0
    assert len(tokenizer) == vocabulary
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    again, _ = encode_prompts(sd, ["a inkstyle cat"], [""])
    assert torch.equal(again.embeds, as_words.embeds)


def test_unknown_words_and_embeddings_for_other_models_stay_words(
    sd: ModelBundle, library: EmbeddingLibrary
) -> None:
    for prompt in ("a narrow cat", "a inkstyles cat", "a zebra cat"):
        with_library, _ = encode_prompts(sd, [prompt], [""], embeddings=library)
        without, _ = encode_prompts(sd, [prompt], [""])
        assert torch.equal(with_library.embeds, without.embeds), prompt
    assert library.used == {}
    with pytest.raises(
        InvalidRequestError, match=r"unknown embedding 'nope'; available embeddings: inkstyle, narrow, tiny"
    ):
        library.get("nope")


def test_sdxl_embeddings_give_each_encoder_its_own_vectors(tmp_path: Path) -> None:
    tokenizer = make_clip_tokenizer(tmp_path / "tok")
    tokenizer_2 = make_clip_tokenizer(tmp_path / "tok2", pad_token="!")
    bundle = text_bundle(
        [make_text_encoder(0), make_text_encoder(1, projection=True)], [tokenizer, tokenizer_2], family="sdxl"
    )
    clip_l, clip_g = vectors(2, 5), vectors(2, 6)
    write(tmp_path / "emb", "inkxl", {"clip_l": clip_l, "clip_g": clip_g})
    write(tmp_path / "emb", "inksd", {"emb_params": vectors(2, 7)})  # an SD 1.x embedding: skipped
    library = EmbeddingLibrary.from_folder(tmp_path / "emb")
    seen_l, handle_l = encoder_input(bundle.text_encoders[0])
    seen_g, handle_g = encoder_input(bundle.text_encoders[1])
    try:
        encode_prompts(bundle, ["a inkxl inksd"], [""], embeddings=library)
    finally:
        handle_l.remove()
        handle_g.remove()
    assert torch.equal(seen_l[0][0, 2:4], with_positions(bundle.text_encoders[0], clip_l, 2))
    assert torch.equal(seen_g[0][0, 2:4], with_positions(bundle.text_encoders[1], clip_g, 2))
    assert list(library.used) == ["inkxl"]


def test_file_formats(tmp_path: Path) -> None:
    one = vectors(3, 8)
    assert torch.equal(parse_embedding({"emb_params": one}, "x")[0], one)
    assert torch.equal(parse_embedding({"string_to_param.*": one}, "x")[0], one)
    assert parse_embedding({"<token>": one[0]}, "x")[0].shape == (1, DIM)  # a single vector
    pair = parse_embedding({"clip_g": vectors(2, 9, 64), "clip_l": one[:2]}, "x")
    assert [tuple(v.shape) for v in pair] == [(2, DIM), (2, 64)]
    with pytest.raises(ModelLoadError, match="not a textual-inversion embedding.*found 2 tensors"):
        parse_embedding({"a": one, "b": one}, "x")
    pickle = tmp_path / "x.pt"
    pickle.write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        read_embedding(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        read_embedding(broken)


def test_a_generation_uses_the_embedding_and_records_its_hash(tmp_path: Path) -> None:
    bundle = bundle_from(sd_components(tmp_path / "tok"))
    models = tmp_path / "models"
    path = write(models / "embeddings", "inkstyle", {"emb_params": vectors(2, 1)})
    plugins = make_plugin_manager(entry_points=False, plugin_dirs=[])
    engine = Engine(plugins=plugins, models_dir=str(models))
    bare = Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=str(tmp_path / "none")
    )
    request = GenerationRequest(
        prompt="a inkstyle cat", steps=2, seed=3, width=64, height=64, sampler="Euler a"
    )

    plain_before = engine.generate(request.replace(prompt="a cat"), bundle=bundle).images[0]
    used = engine.generate(request, bundle=bundle).images[0]
    as_word = bare.generate(request, bundle=bundle).images[0]
    plain_after = engine.generate(request.replace(prompt="a cat"), bundle=bundle).images[0]

    assert float((used.pixels - as_word.pixels).abs().max()) > 1e-4
    assert torch.equal(plain_before.pixels, plain_after.pixels)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert parse_infotext(used.parameters["infotext"])["TI hashes"] == f"inkstyle: {digest}"
    assert "TI hashes" not in plain_after.parameters and "TI hashes" not in as_word.parameters
