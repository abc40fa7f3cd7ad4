"""Prompt encoding with A1111's long-prompt chunking and emphasis weights.

A prompt is parsed into weighted fragments (:mod:`webui.engine.prompt_parser`), each fragment is
tokenized without special tokens, and the tokens are cut into chunks of ``window - 2`` tokens (75 for
CLIP). ``BREAK`` ends a chunk early. Each chunk is wrapped as ``[BOS] tokens [EOS] padding`` up to the
encoder's window, encoded on its own, and the chunks are concatenated along the token axis. Positive
and negative prompts are padded with empty chunks to one common chunk count.

A non-CLIP encoder gives its last hidden state, or, when the model's ``model_index.json`` names
``"text_conditioning": {"hidden_states": [...]}``, those hidden states (indices into the encoder's
``hidden_states``, 0 being the embedding layer) concatenated along the feature axis, as SDXL
concatenates its two encoders' states.

Textual-inversion embeddings (:mod:`webui.engine.embeddings`) given to :func:`encode_prompts` are
found by name in the tokens of every prompt: the name's tokens become placeholders, one per vector,
and a forward hook on the encoder's token-embedding layer writes the vectors there while the chunk
is encoded; the tokenizer and the encoder's weights are never changed. A1111's extra-network tags
(``<lora:name:0.8>``) are removed from the positive prompts before they are tokenized (the LoRAs
themselves are applied by the engine, :mod:`webui.engine.lora`); negative prompts are left as they
are, as in A1111.

Emphasis follows A1111: each token's embedding is multiplied by its weight, then the chunk is
rescaled so that its mean equals the unweighted mean. The rescale is done per prompt and per chunk
(A1111 takes the mean over the whole batch), and chunks whose weights are all 1.0 are left untouched,
so an unweighted prompt encodes exactly like the plain diffusers pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from webui.engine.bundle import ModelBundle
from webui.engine.clip_tokenizer import split_long_words
from webui.engine.embeddings import EmbeddingLibrary, EmbeddingMatcher, embedding_dims, input_embedding_layer
from webui.engine.lora import strip_network_tags
from webui.engine.models import model_lock
from webui.engine.prompt_parser import is_break, parse_prompt_attention
from webui.errors import InvalidRequestError, ModelLoadError
from webui.limits import check_total

_UNBOUNDED = 1_000_000  # tokenizers report a huge model_max_length when they have no limit
_DEFAULT_WINDOW = 77
EMBEDDING_PLACEHOLDER = 0  # token id under an embedding's vectors (A1111 uses 0 too)


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``embeds`` is ``(B, T, D)`` with ``T = n_chunks * window``; ``pooled`` is
    ``(B, P)`` for SDXL (from the last encoder's first chunk) and ``None`` otherwise."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class PromptChunk:
    """At most ``window - 2`` token ids of one prompt, with one weight per token (no special tokens).

    ``fixes`` are the textual-inversion embeddings in the chunk: ``(offset, vectors)`` where the
    ``(N, D)`` vectors replace the token embeddings of ``tokens[offset:offset + N]`` (placeholders).
    """

    tokens: list[int]
    weights: list[float]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenLayout:
    """How one tokenizer/encoder pair frames a chunk: window length and the special token ids."""

    window: int
    start_id: int
    end_id: int
    pad_id: int

    @property
    def chunk_size(self) -> int:
        return self.window - 2

    def frame(self, chunk: PromptChunk) -> tuple[list[int], list[float], list[int]]:
        """``(ids, weights, attention_mask)`` of a chunk wrapped in its special tokens and padded."""
        n_pad = self.window - len(chunk.tokens) - 2
        ids = [self.start_id, *chunk.tokens, self.end_id] + [self.pad_id] * n_pad
        weights = [1.0, *chunk.weights, 1.0] + [1.0] * n_pad
        mask = [1] * (len(chunk.tokens) + 2) + [0] * n_pad
        return ids, weights, mask


def _config_int(obj: Any, name: str) -> int | None:
    value = getattr(getattr(obj, "config", None), name, None)
    return value if isinstance(value, int) else None


def token_layout(tokenizer: Any, text_encoder: Any) -> TokenLayout:
    """The chunk layout of a tokenizer/encoder pair (CLIP: BOS/EOS; BERT-style: CLS/SEP)."""
    limits = [
        n
        for n in (
            getattr(tokenizer, "model_max_length", None),
            _config_int(text_encoder, "max_position_embeddings"),
        )
        if isinstance(n, int) and 2 < n < _UNBOUNDED
    ]
    window = min(limits) if limits else _DEFAULT_WINDOW
    if (
        getattr(tokenizer, "cls_token_id", None) is not None
        and getattr(tokenizer, "sep_token_id", None) is not None
    ):
        start, end = tokenizer.cls_token_id, tokenizer.sep_token_id
    else:
        start, end = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if start is None or end is None:
        raise ModelLoadError(
            f"The tokenizer {type(tokenizer).__name__} has no start/end tokens (BOS/EOS or CLS/SEP); "
            "this model's text encoder is not supported."
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    return TokenLayout(window=window, start_id=start, end_id=end, pad_id=end if pad is None else pad)


MAX_EMPHASIS = 100.0
"""The largest emphasis weight a token may get: ``(`` nested 250 deep is 1.1**250, about 2e10, which
turns the embeddings (and then the image) into infinities; such a prompt gets a message instead."""


def chunk_prompt(
    tokenizer: Any, prompt: str, chunk_size: int, matcher: EmbeddingMatcher | None = None
) -> list[PromptChunk]:
    """Tokenize ``prompt`` fragment by fragment and cut the tokens into chunks of ``chunk_size``.

    A full chunk is closed only when another token arrives, so ``BREAK`` right after exactly
    ``chunk_size`` tokens does not add an empty chunk. A prompt always gives at least one chunk.
    With a ``matcher``, an embedding's name becomes one placeholder per vector (weighted like the
    fragment it is in); an embedding that does not fit in the current chunk starts the next one.
    """
    fragments = parse_prompt_attention(prompt)
    for text, weight in fragments:
        if not is_break((text, weight)) and not abs(weight) <= MAX_EMPHASIS:  # also NaN
            raise InvalidRequestError(
                f"the emphasis on {text.strip()[:40]!r} gives it a weight of {weight:g}; weights must stay "
                f"within ±{MAX_EMPHASIS:g} (are brackets nested too deep, or left open?)"
            )
    texts = [split_long_words(text) for text, weight in fragments if not is_break((text, weight))]
    token_lists = iter(
        tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    )
    chunks: list[PromptChunk] = []
    current = PromptChunk([], [])
    for fragment in fragments:
        if is_break(fragment):
            chunks.append(current)
            current = PromptChunk([], [])
            continue
        tokens = [int(token) for token in next(token_lists)]
        weight = float(fragment[1])
        position = 0
        while position < len(tokens):
            found = matcher.match(tokens, position) if matcher is not None else None
            if found is None:
                if len(current.tokens) == chunk_size:
                    chunks.append(current)
                    current = PromptChunk([], [])
                current.tokens.append(tokens[position])
                current.weights.append(weight)
                position += 1
                continue
            embedding, vectors, consumed = found
            length = int(vectors.shape[0])
            if length > chunk_size:
                raise InvalidRequestError(
                    f"the embedding {embedding.name!r} has {length} vectors; at most {chunk_size} fit in a prompt chunk"
                )
            if len(current.tokens) + length > chunk_size:
                chunks.append(current)
                current = PromptChunk([], [])
            current.fixes.append((len(current.tokens), vectors))
            current.tokens.extend([EMBEDDING_PLACEHOLDER] * length)
            current.weights.extend([weight] * length)
            position += consumed
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def _is_clip(text_encoder: Any) -> bool:
    return getattr(getattr(text_encoder, "config", None), "model_type", None) in ("clip_text_model", "clip")


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    """CLIP's final LayerNorm (on the model itself in transformers 5, on ``text_model`` before)."""
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    if norm is None:
        raise ModelLoadError(
            f"{type(text_encoder).__name__} has no final_layer_norm; clip skip is not supported."
        )
    return norm


def _module_device(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _module_dtype(module: Any) -> torch.dtype:
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


def _check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    if clip_skip < 1:
        raise InvalidRequestError(f"clip_skip must be 1 or more (1 means no skip), got {clip_skip}.")
    n_layers = _config_int(text_encoder, "num_hidden_layers")
    if n_layers is not None and clip_skip > n_layers:
        raise InvalidRequestError(
            f"clip_skip is {clip_skip} but this text encoder has only {n_layers} layers."
        )


def hidden_state_layers(bundle: ModelBundle) -> tuple[int, ...] | None:
    """The hidden states a non-CLIP encoder's output is made of (``text_conditioning.hidden_states``
    in ``model_index.json``), or ``None`` for the last hidden state alone."""
    setting = bundle.config.get("text_conditioning") or {}
    layers = setting.get("hidden_states") if isinstance(setting, dict) else None
    if layers is None:
        return None
    if not isinstance(layers, list | tuple) or not layers or not all(isinstance(i, int) for i in layers):
        raise ModelLoadError(
            f"The model {bundle.name!r} has text_conditioning.hidden_states {layers!r}; "
            "it must be a non-empty list of layer indices."
        )
    return tuple(layers)


def _run_encoder(
    text_encoder: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_skip: int,
    sdxl: bool,
    layers: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``(n, window, D)`` of one batch of framed chunks, and the pooled output if any."""
    if not _is_clip(text_encoder):
        out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=layers is not None)
        if layers is None:
            return out.last_hidden_state, None
        states = out.hidden_states
        if any(not -len(states) <= i < len(states) for i in layers):
            raise ModelLoadError(
                f"text_conditioning.hidden_states {list(layers)} asks for layers this text encoder lacks "
                f"(it has hidden states 0 to {len(states) - 1})."
            )
        return torch.cat([states[i] for i in layers], dim=-1), None
    attention_mask = mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    need_hidden = sdxl or clip_skip > 1
    out = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=need_hidden)
    if sdxl:
        hidden = out.hidden_states[-(clip_skip + 1)]
    elif clip_skip > 1:
        hidden = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    else:
        hidden = out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    return hidden, pooled


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token by its weight and restore each row's mean (A1111's emphasis)."""
    weighted_rows = (weights != 1.0).any(dim=1)
    if not bool(weighted_rows.any()):
        return hidden
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z.device, torch.float32).unsqueeze(-1)
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    z = (z * ratio).to(hidden.dtype)
    return torch.where(weighted_rows.to(hidden.device)[:, None, None], z, hidden)


@contextmanager
def _embeddings_written(text_encoder: Any, fixes: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
    """While active, the encoder's token-embedding layer returns ``vectors`` at ``(row, start...)``
    for every ``(row, start, vectors)`` in ``fixes`` instead of the placeholders' embeddings."""
    if not fixes:
        yield
        return

    def write(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, start, vectors in fixes:
            output[row, start : start + vectors.shape[0]] = vectors.to(
                device=output.device, dtype=output.dtype
            )
        return output

    handle = input_embedding_layer(text_encoder).register_forward_hook(write)
    try:
        yield
    finally:
        handle.remove()


def _encode_all(
    text_encoder: Any,
    layout: TokenLayout,
    chunks_per_prompt: list[list[PromptChunk]],
    n_chunks: int,
    *,
    clip_skip: int,
    sdxl: bool,
    layers: tuple[int, ...] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode every prompt's chunks with one encoder: ``(N, n_chunks * window, D)`` and the pooled
    output of the first chunk. ``should_stop`` is called before each chunk (it raises to stop)."""
    device = _module_device(text_encoder)
    empty = PromptChunk([], [])
    parts: list[torch.Tensor] = []
    pooled_first: torch.Tensor | None = None
    for index in range(n_chunks):
        if should_stop is not None:
            should_stop()
        framed = [
            layout.frame(chunks[index] if index < len(chunks) else empty) for chunks in chunks_per_prompt
        ]
        ids = torch.tensor([f[0] for f in framed], dtype=torch.long, device=device)
        weights = torch.tensor([f[1] for f in framed], dtype=torch.float32)
        mask = torch.tensor([f[2] for f in framed], dtype=torch.long, device=device)
        fixes = [
            (row, 1 + offset, vectors)  # + 1: the chunk's start token comes first
            for row, chunks in enumerate(chunks_per_prompt)
            if index < len(chunks)
            for offset, vectors in chunks[index].fixes
        ]
        with _embeddings_written(text_encoder, fixes):
            hidden, pooled = _run_encoder(
                text_encoder, ids, mask, clip_skip=clip_skip, sdxl=sdxl, layers=layers
            )
        parts.append(_apply_weights(hidden, weights))
        if index == 0:
            pooled_first = pooled
    return torch.cat(parts, dim=1), pooled_first


def encode_prompts(
    bundle: ModelBundle,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    embeddings: EmbeddingLibrary | None = None,
    max_chunks: int = 0,
    should_stop: Callable[[], None] | None = None,
) -> tuple[PromptEmbeds, PromptEmbeds]:
    """Encode positive and negative prompts; both padded to the same number of chunks.

    Extra-network tags (``<lora:...>``) are removed from the positive prompts. ``embeddings``: the
    textual-inversion embeddings whose names are replaced by their vectors in every prompt (those
    used are recorded in ``embeddings.used``). The encoding holds the bundle's lock (see
    :func:`webui.engine.models.model_lock`), so it never sees another request's LoRAs.

    ``clip_skip`` counts like A1111: 1 uses the last layer (the penultimate one for SDXL), 2 the one
    before... Non-CLIP encoders ignore it. ``device``/``dtype`` default to the last text encoder's.
    If ``bundle.config["force_zeros_for_empty_prompt"]`` is true, empty negative prompts give zero
    embeddings and zero pooled embeddings, as the SDXL pipelines do.

    ``max_chunks`` (0 = no limit): a prompt needing more chunks is refused with
    :class:`~webui.limits.LimitExceeded` before anything is encoded. ``should_stop`` is called
    before each chunk is encoded and stops the encoding by raising (an interrupt takes effect
    within one chunk, also for a long prompt).
    """
    prompts, negative_prompts = list(prompts), list(negative_prompts)
    if not prompts:
        raise InvalidRequestError("At least one prompt is needed.")
    if len(negative_prompts) != len(prompts):
        raise InvalidRequestError(
            f"Got {len(prompts)} prompts but {len(negative_prompts)} negative prompts; give one negative per prompt."
        )
    encoders, tokenizers = list(bundle.text_encoders), list(bundle.tokenizers)
    if not encoders or len(encoders) != len(tokenizers):
        raise ModelLoadError(
            f"The model {bundle.name!r} needs one tokenizer per text encoder "
            f"(has {len(tokenizers)} tokenizers, {len(encoders)} text encoders)."
        )
    sdxl = bundle.is_sdxl
    layers = hidden_state_layers(bundle)
    for encoder in encoders:
        if _is_clip(encoder):
            _check_clip_skip(encoder, clip_skip)

    layouts = [token_layout(tok, enc) for tok, enc in zip(tokenizers, encoders, strict=True)]
    if len({layout.window for layout in layouts}) > 1:
        raise ModelLoadError(
            f"The text encoders of {bundle.name!r} have different windows "
            f"({', '.join(str(layout.window) for layout in layouts)}); they cannot be combined."
        )
    everything = [strip_network_tags(text) for text in prompts] + negative_prompts
    matchers: list[EmbeddingMatcher | None] = [None] * len(encoders)
    if embeddings is not None and len(embeddings):
        dims = embedding_dims(encoders)
        matchers = [embeddings.matcher(tok, dims, index) for index, tok in enumerate(tokenizers)]
    chunked = [
        [chunk_prompt(tok, text, layout.chunk_size, matcher) for text in everything]
        for tok, layout, matcher in zip(tokenizers, layouts, matchers, strict=True)
    ]
    n_chunks = max(len(chunks) for per_encoder in chunked for chunks in per_encoder)
    if max_chunks:
        for per_encoder in chunked:
            for index, chunks in enumerate(per_encoder):
                what = "prompt" if index < len(prompts) else "negative prompt"
                check_total(
                    f"the {what} needs {len(chunks)} chunks of {layouts[0].chunk_size} tokens",
                    len(chunks),
                    max_chunks,
                    "max_prompt_chunks",
                )

    out_device = torch.device(device) if device is not None else _module_device(encoders[-1])
    out_dtype = dtype if dtype is not None else _module_dtype(encoders[-1])
    embeds_parts: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    with torch.no_grad(), model_lock(bundle):
        for enc, layout, per_prompt in zip(encoders, layouts, chunked, strict=True):
            hidden, pooled = _encode_all(
                enc,
                layout,
                per_prompt,
                n_chunks,
                clip_skip=clip_skip,
                sdxl=sdxl,
                layers=layers,
                should_stop=should_stop,
            )
            embeds_parts.append(hidden.to(device=out_device, dtype=out_dtype))
    embeds = torch.cat(embeds_parts, dim=-1)
    if sdxl and pooled is not None:
        pooled = pooled.to(device=out_device, dtype=out_dtype)
    else:
        pooled = None

    if bundle.config.get("force_zeros_for_empty_prompt"):
        offset = len(prompts)
        for i, negative_prompt in enumerate(negative_prompts):
            if not negative_prompt.strip():
                embeds[offset + i] = 0
                if pooled is not None:
                    pooled[offset + i] = 0

    n = len(prompts)
    positive = PromptEmbeds(embeds[:n], None if pooled is None else pooled[:n])
    negative = PromptEmbeds(embeds[n:], None if pooled is None else pooled[n:])
    return positive, negative
