"""The CLIP tokenizer of Stable Diffusion, built offline from the BPE merges shipped in ``webui/configs``.

Single-file checkpoints carry no tokenizer, and tokenizer files cannot be downloaded here. Every SD
text encoder (OpenAI CLIP ViT-L for SD 1.x and SDXL's first encoder, OpenCLIP ViT-H / bigG for SD 2.x
and SDXL's second) uses the same byte-level BPE: ``bpe_simple_vocab_16e6.txt.gz`` (from the
``open_clip_torch`` wheel, MIT licence; see ``webui/configs/README.md``). Its vocabulary is derived,
not stored: the 256 byte symbols, the same with ``</w>`` (end of word), one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``: 49,408 entries.

The tokenizers differ only in padding: SD 1.x pads with ``<|endoftext|>``; OpenCLIP encoders
(SD 2.x, SDXL's second) pad with ``!`` (id 0).

BPE merges the symbols of one word at a time, and its work grows faster than the word's length
(quadratically in the Python tokenizers of older transformers releases). :func:`split_long_words`
bounds the words: prompts are passed through it before any tokenizer sees them, so a prompt of one
huge "word" costs time linear in its length.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from webui.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BPE_FILE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # CLIP uses the first 48,894 merges of the file
START, END = "<|startoftext|>", "<|endoftext|>"

MAX_WORD_CHARS = 256
"""The longest run of non-space characters a tokenizer gets in one piece (CLIP's longest token has
32 characters; an embedding's file name has at most 255)."""
_SPACES = r" \t\n\r\f\v"  # ASCII whitespace: every tokenizer splits words there
_LONG_WORD = re.compile(rf"(?<![^{_SPACES}])[^{_SPACES}]{{{MAX_WORD_CHARS + 1},}}")


def split_long_words(text: str) -> str:
    """``text`` with a space after every :data:`MAX_WORD_CHARS` characters of each run of non-space
    characters longer than that; any other text is returned unchanged. Linear in ``len(text)``: a
    run is matched only from its first character."""

    def cut(match: re.Match[str]) -> str:
        word = match.group(0)
        return " ".join(word[i : i + MAX_WORD_CHARS] for i in range(0, len(word), MAX_WORD_CHARS))

    return _LONG_WORD.sub(cut, text)


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in CLIP's vocabulary order: the printable
    bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) as themselves, then every other byte mapped to
    ``chr(256 + n)``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's ``(vocab, merges)``, read once from the shipped BPE file."""
    try:
        with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except OSError as exc:
        raise ModelLoadError(
            f"the CLIP tokenizer's merges file {BPE_FILE} is missing or unreadable: {exc}"
        ) from exc
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])  # line 0 is a version tag
    if len(merges) != N_MERGES or any(len(pair) != 2 for pair in merges):
        raise ModelLoadError(f"{BPE_FILE} is not CLIP's BPE merges file")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(pair) for pair in merges), START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelLoadError(f"{BPE_FILE} gives {len(vocab)} distinct tokens, not CLIP's {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(*, pad_token: str = END, model_max_length: int = 77) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` with CLIP's vocabulary. ``pad_token`` is ``"<|endoftext|>"``
    (SD 1.x) or ``"!"`` (OpenCLIP encoders)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    if pad_token not in vocab:
        raise ModelLoadError(f"pad token {pad_token!r} is not in CLIP's vocabulary")
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # pairs, which the tokenizers backend takes as well as strings
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
