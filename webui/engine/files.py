"""Reading weight files safely: ``.safetensors`` checked before it is read, pickles only on request.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the raw tensor bytes. :func:`read_safetensors_header`
checks all of that against the file's real size *before* anything large is allocated, so a damaged
or hostile file gives a one-line :class:`~webui.errors.ModelLoadError` instead of a huge allocation,
a crash in native code or a raw traceback. The header alone is enough to tell what a checkpoint is
(:mod:`webui.engine.single_file` detects the model family from it without reading any tensor).

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run arbitrary code when unpickled.
They are refused unless the user opts in (``--allow-pickle``, ``LoadContext.allow_pickle``), and even
then they are read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain
containers.
"""

from __future__ import annotations

import json
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from webui.errors import ModelLoadError, ModelNotFoundError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
WEIGHT_SUFFIXES = frozenset({SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
ALLOW_PICKLE_FLAG = "--allow-pickle"

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it; ``start``/``end`` are byte offsets into the
    data section (after the header)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a ``.safetensors`` file: its tensors and its ``__metadata__`` strings."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}


def pickle_refusal(path: str | Path) -> str:
    """The message that explains why a pickle checkpoint is not loaded and how to opt in."""
    return (
        f"{Path(path).name} is a pickle checkpoint ({Path(path).suffix}). Unpickling a file can run "
        "arbitrary code hidden in it, so pickle checkpoints are refused. Prefer the .safetensors "
        f"version of this model; if you trust this file, start with {ALLOW_PICKLE_FLAG} "
        "(it is then read with torch.load(weights_only=True), which rebuilds only tensors)."
    )


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of a ``.safetensors`` file without reading any tensor data.

    Refused with :class:`ModelLoadError`: a file shorter than 8 bytes, a header length beyond
    100 MB or beyond the file, a header that is not a JSON object, unknown dtypes, malformed shapes,
    byte ranges that do not match the shape, overlap, leave gaps or reach past the end of the file
    (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path.name} is not a safetensors file: it is only {size} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise ModelLoadError(
                    f"{path.name} is not a valid safetensors file: its header claims {header_len} bytes "
                    f"but the file has {size - 8} bytes after the length field (damaged or not safetensors)"
                )
            raw = handle.read(header_len)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model file not found: {path}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path.name} is not a valid safetensors file: its header is not JSON ({exc})"
        ) from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{path.name}: the safetensors __metadata__ is not a JSON object")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - 8 - header_len)
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{path.name}: header entry {name!r} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelLoadError(f"{path.name}: tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ModelLoadError(f"{path.name}: tensor {name!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ModelLoadError(f"{path.name}: tensor {name!r} has malformed data_offsets {offsets!r}")
    numel = 1
    for n in shape:
        numel *= n
    if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
        raise ModelLoadError(
            f"{path.name}: tensor {name!r} ({dtype}, shape {shape}) needs {numel * DTYPE_SIZES[dtype]} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """The tensors must tile the data section exactly, as the safetensors format requires."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_size:
            raise ModelLoadError(
                f"{path.name} is truncated or damaged: tensor {name!r} ends at byte {info.end} of the data "
                f"but the file holds only {data_size} data bytes (download it again)"
            )
        if info.start != position:
            what = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise ModelLoadError(
                f"{path.name} is damaged: tensor {name!r} {what} (offset {info.start}, expected {position})"
            )
        position = info.end
    if position != data_size:
        raise ModelLoadError(
            f"{path.name} is damaged: its tensors end at byte {position} but {data_size} data bytes follow "
            "the header"
        )


def read_shapes(
    path: str | Path, *, allow_pickle: bool = False
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and metadata of a weight file: from the header alone for safetensors (no
    tensor is read); a pickle checkpoint has no header, so it is loaded (see :func:`load_state_dict`)."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        header = read_safetensors_header(path)
        return header.shapes, header.metadata
    state = load_state_dict(path, allow_pickle=allow_pickle)
    return {name: tuple(t.shape) for name, t in state.items()}, {}


def load_state_dict(
    path: str | Path, *, allow_pickle: bool = False, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file (or only ``keys``), on the CPU.

    ``.safetensors`` is checked with :func:`read_safetensors_header` first. Pickle checkpoints need
    ``allow_pickle`` and are read with ``weights_only=True``; a Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped and entries that are not tensors (step counters...) are dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        header = read_safetensors_header(path)
        wanted = list(header.tensors) if keys is None else [k for k in keys if k in header.tensors]
        return _read_safetensors(path, wanted)
    if suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: unknown weight file type {suffix or '(no suffix)'}; expected .safetensors "
            f"(or, with {ALLOW_PICKLE_FLAG}, one of {', '.join(sorted(PICKLE_SUFFIXES))})"
        )
    if not allow_pickle:
        raise ModelLoadError(pickle_refusal(path))
    state = _read_pickle(path)
    if keys is not None:
        wanted_keys = set(keys)
        state = {k: v for k, v in state.items() if k in wanted_keys}
    return state


def _read_safetensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except Exception as exc:  # the header was checked, so this is an I/O or format corner case
        raise ModelLoadError(f"cannot read {path.name}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model file not found: {path}") from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} cannot be read as plain weights (torch.load with weights_only=True refused it: "
            f"{_first_line(exc)}). It holds Python objects besides tensors; convert it to .safetensors "
            "with a tool you trust."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name} does not hold a state dict (found {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelLoadError(f"{path.name} holds no tensors")
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300].strip() if lines else type(exc).__name__


class FileCache:
    """The last ``size`` values read from files, keyed by path, size and modification time, so a
    file that changed on disk is read again. Thread-safe; ``read`` runs outside the lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, read: Callable[[Path], Any], *, what: str) -> Any:
        """The cached value for ``path``, else ``read(path)`` (then cached). ``what`` names the file
        in the error when it can't be read."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelLoadError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = read(path)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value
