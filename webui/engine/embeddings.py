"""Textual-inversion embeddings, used as in AUTOMATIC1111: write the file's name in a prompt.

An embedding is a ``.safetensors`` file in ``models/embeddings/`` (subfolders too). Its name is the
file name without ``.safetensors``; wherever that name appears in a prompt (positive or negative,
inside emphasis such as ``(name:1.2)`` too), its tokens are replaced by the embedding's N vectors,
which count as N tokens when the prompt is cut into chunks. An embedding that would cross a chunk
boundary starts the next chunk, as A1111 does.

Matching is done on tokens, as A1111 does: the name is tokenized with the model's tokenizer and the
prompt's tokens are searched for that sequence, so CLIP's lower-casing makes the match
case-insensitive, and ``names`` does not match an embedding called ``name`` when the two tokenize
differently.

File formats (A1111's): one tensor under any key (``emb_params``, ``*``, a token string...), one key
``string_to_param.<token>`` (the flattened ``{"string_to_param": {"*": tensor}}``), or SDXL's pair
``clip_l`` / ``clip_g`` (one set of vectors per text encoder). An embedding made for another model
family (other vector sizes, or a single tensor on SDXL) is skipped and its name stays an ordinary
word, as in A1111.

Neither the tokenizer nor the text encoder is changed: the vectors are written into the output of
the encoder's token-embedding layer by a forward hook that lives only while one prompt batch is
encoded (see :mod:`webui.engine.text`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from webui.engine.files import FileCache
from webui.errors import InvalidRequestError, ModelLoadError

EMBEDDING_SUFFIX = ".safetensors"
EMBEDDINGS_FOLDER = "embeddings"
STATE_KEY = "embeddings"  # RunContext.state: the request's EmbeddingLibrary (set by webui.builtin.embeddings)
SDXL_KEYS = ("clip_l", "clip_g")  # vectors for text encoder 1 and 2 of SDXL embeddings
_STRING_TO_PARAM = "string_to_param."
_CACHE_SIZE = 256


@dataclass(frozen=True)
class TextualInversion:
    """One loaded embedding.

    ``vectors`` holds one ``(N, D)`` float32 tensor per text encoder the embedding was made for (one
    for SD 1.x/2.x, ``clip_l`` then ``clip_g`` for SDXL). ``hash`` is A1111's short hash of an
    embedding: the first 12 hex digits of the file's sha256 (what ``TI hashes`` records).
    """

    name: str
    path: Path
    vectors: tuple[torch.Tensor, ...]
    hash: str

    @property
    def length(self) -> int:
        """How many tokens the embedding takes in a prompt."""
        return int(self.vectors[0].shape[0])

    def vectors_for(self, dims: Sequence[int]) -> tuple[torch.Tensor, ...] | None:
        """The vectors for a model whose text encoders take vectors of sizes ``dims`` (one per
        encoder), or ``None`` when the embedding was made for another kind of model."""
        if len(dims) != len(self.vectors):
            return None
        if any(int(v.shape[-1]) != int(d) for v, d in zip(self.vectors, dims, strict=True)):
            return None
        return self.vectors


def _sha256_prefix(path: Path, digits: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def _as_matrix(tensor: torch.Tensor, name: str, key: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or not tensor.is_floating_point():
        raise ModelLoadError(
            f"embedding {name!r}: {key!r} holds a {tuple(tensor.shape)} {tensor.dtype} tensor; "
            "expected (vectors, size) floats"
        )
    return tensor.detach().to(torch.float32).contiguous()


def parse_embedding(data: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, ...]:
    """The vectors of an embedding file's tensors (see the module doc for the formats).

    Raises :class:`~webui.errors.ModelLoadError` for anything else, naming what was found.
    """
    keys = list(data)
    if all(k in data for k in SDXL_KEYS):
        vectors = tuple(_as_matrix(data[k], name, k) for k in SDXL_KEYS)
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise ModelLoadError(
                f"embedding {name!r}: clip_l has {vectors[0].shape[0]} vectors but clip_g {vectors[1].shape[0]}"
            )
        return vectors
    params = [k for k in keys if k.startswith(_STRING_TO_PARAM)]
    if len(params) == 1:
        return (_as_matrix(data[params[0]], name, params[0]),)
    if len(keys) == 1:
        return (_as_matrix(data[keys[0]], name, keys[0]),)
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise ModelLoadError(
        f"embedding {name!r} is not a textual-inversion embedding: expected one tensor (such as "
        f"emb_params), string_to_param, or clip_l and clip_g; found {len(keys)} tensors ({shown or 'none'})"
    )


_files = FileCache(_CACHE_SIZE)


def read_embedding(path: str | Path, name: str | None = None) -> TextualInversion:
    """Load an embedding file (``.safetensors`` only; pickles can run code when loaded).

    Loaded files are cached by path, size and modification time, so a changed file is read again.
    """
    path = Path(path)
    name = name or path.stem
    if path.suffix.lower() != EMBEDDING_SUFFIX:
        raise ModelLoadError(f"embedding {name!r}: only .safetensors embeddings are loaded, not {path.name}")
    loaded = _files.get(path, _read_embedding_file, what=f"embedding {name!r}")
    return loaded if loaded.name == name else TextualInversion(name, path, loaded.vectors, loaded.hash)


def _read_embedding_file(path: Path) -> TextualInversion:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelLoadError(
            f"embedding {path.stem!r}: {path.name} is not a readable .safetensors file ({exc})"
        ) from exc
    return TextualInversion(
        name=path.stem, path=path, vectors=parse_embedding(data, path.stem), hash=_sha256_prefix(path)
    )


def _is_safe_file(path: Path) -> bool:
    return path.suffix.lower() == EMBEDDING_SUFFIX and path.is_file()


def scan_folder(folder: str | Path | None) -> dict[str, Path]:
    """``{name: path}`` for every ``.safetensors`` file under ``folder`` (name = file stem; the
    first path in sorted order wins when two subfolders hold the same name)."""
    files: dict[str, Path] = {}
    if folder is None or not Path(folder).is_dir():
        return files
    for path in sorted(Path(folder).rglob(f"*{EMBEDDING_SUFFIX}")):
        if path.is_file():
            files.setdefault(path.stem, path)
    return files


class EmbeddingLibrary:
    """The embeddings one request may use: names mapped to files, loaded on first use.

    ``used`` collects the embeddings that prompts actually used (for ``TI hashes``); a library is
    made per request, so nothing is shared between requests but the file cache.
    """

    def __init__(self, files: Mapping[str, str | Path]) -> None:
        self.files: dict[str, Path] = {name: Path(path) for name, path in files.items() if name.strip()}
        self.used: dict[str, TextualInversion] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> EmbeddingLibrary:
        """Every ``.safetensors`` embedding under ``folder``."""
        return cls(scan_folder(folder))

    @classmethod
    def from_models(cls, models: Any) -> EmbeddingLibrary:
        """The ``.safetensors`` embeddings a model manager lists (kind ``"embedding"``: the
        ``embeddings`` folders, see :mod:`webui.engine.folders`), by file stem as A1111 names them."""
        files: dict[str, Path] = {}
        for entry in models.list("embedding"):
            path = Path(str(entry.source))
            if _is_safe_file(path):
                files.setdefault(path.stem, path)
        return cls(files)

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, name: str) -> TextualInversion:
        """The embedding called ``name``; an unknown name raises :class:`InvalidRequestError` that
        lists the embeddings there are."""
        path = self.files.get(name)
        if path is None:
            names = self.names
            available = ", ".join(names[:40]) or "none (put .safetensors files into models/embeddings/)"
            if len(names) > 40:
                available += f" and {len(names) - 40} more"
            raise InvalidRequestError(f"unknown embedding {name!r}; available embeddings: {available}")
        return read_embedding(path, name)

    def mark_used(self, embedding: TextualInversion) -> None:
        with self._lock:
            self.used.setdefault(embedding.name, embedding)

    def matcher(self, tokenizer: Any, dims: Sequence[int], index: int) -> EmbeddingMatcher | None:
        """A matcher for prompts tokenized by ``tokenizer`` feeding text encoder ``index`` of a model
        whose encoders take vectors of sizes ``dims``; ``None`` when there is nothing to match."""
        if not self.files:
            return None
        names = self.names
        token_lists = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"]
        lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name, ids in zip(names, token_lists, strict=True):
            ids = tuple(int(i) for i in ids)
            if ids:
                lookup.setdefault(ids[0], []).append((ids, name))
        for candidates in lookup.values():
            candidates.sort(key=lambda item: -len(item[0]))  # the longest name wins, as in A1111
        return EmbeddingMatcher(self, lookup, tuple(int(d) for d in dims), index)

    def metadata(self) -> dict[str, str]:
        """``{"TI hashes": "name: hash, ..."}`` for the embeddings used, else ``{}`` (A1111 drops
        ``:`` and ``,`` from the names so the value parses back)."""
        if not self.used:
            return {}
        items = [f"{_clean_name(name)}: {emb.hash}" for name, emb in self.used.items()]
        return {"TI hashes": ", ".join(items)}


def _clean_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


@dataclass
class EmbeddingMatcher:
    """Finds embedding names in a token list, for one tokenizer and one text encoder."""

    library: EmbeddingLibrary
    lookup: dict[int, list[tuple[tuple[int, ...], str]]]
    dims: tuple[int, ...]
    index: int
    _skipped: set[str] = field(default_factory=set)
    _found: dict[str, tuple[TextualInversion, torch.Tensor]] = field(default_factory=dict)

    def match(
        self, tokens: Sequence[int], position: int
    ) -> tuple[TextualInversion, torch.Tensor, int] | None:
        """``(embedding, vectors for this encoder, tokens of the name)`` when an embedding's name
        starts at ``position``, else ``None``.

        The work per position is bounded by the library (the names sharing the token there), not by
        the prompt, and each embedding is loaded once per matcher however often its name appears.
        """
        for ids, name in self.lookup.get(int(tokens[position]), ()):
            if name in self._skipped or tuple(tokens[position : position + len(ids)]) != ids:
                continue
            found = self._found.get(name)
            if found is None:
                embedding = self.library.get(name)
                vectors = embedding.vectors_for(self.dims)
                if vectors is None:  # made for another model family: the name stays a word
                    self._skipped.add(name)
                    continue
                self.library.mark_used(embedding)
                found = self._found[name] = (embedding, vectors[self.index])
            return found[0], found[1], len(ids)
        return None


def embedding_dims(text_encoders: Sequence[Any]) -> list[int]:
    """The size of the token vectors each text encoder takes (its input embedding's width)."""
    dims = []
    for encoder in text_encoders:
        layer = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
        width: Any = getattr(layer, "embedding_dim", None)
        if width is None:
            width = getattr(getattr(encoder, "config", None), "hidden_size", 0)
        dims.append(int(width))
    return dims


def input_embedding_layer(text_encoder: Any) -> torch.nn.Module:
    """The token-embedding layer of a text encoder (where embedding vectors are written)."""
    layer = text_encoder.get_input_embeddings() if hasattr(text_encoder, "get_input_embeddings") else None
    if not isinstance(layer, torch.nn.Module):
        raise ModelLoadError(
            f"{type(text_encoder).__name__} has no token-embedding layer; textual-inversion embeddings "
            "cannot be used with it"
        )
    return layer


__all__ = [
    "EMBEDDINGS_FOLDER",
    "EmbeddingLibrary",
    "EmbeddingMatcher",
    "TextualInversion",
    "embedding_dims",
    "input_embedding_layer",
    "parse_embedding",
    "read_embedding",
    "scan_folder",
]
