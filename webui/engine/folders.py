"""Model folders: where each kind of model lives, the names it is listed by, names kept inside the
folders, and AUTOMATIC1111's "Model hash".

A models root holds one folder per kind, under this project's names or those of AUTOMATIC1111
and ComfyUI, so their existing ``models`` folders can be used as they are:

=============  ==============  ==========================  ==============
kind           ours            AUTOMATIC1111               ComfyUI
=============  ==============  ==========================  ==============
checkpoint     checkpoints/    Stable-diffusion/           checkpoints/
vae            vae/            VAE/                        vae/
controlnet     controlnet/     ControlNet/                 controlnet/
lora           lora/           Lora/, LyCORIS/             loras/
embedding      embeddings/     ../embeddings/ (beside)     embeddings/
upscaler       upscalers/      ESRGAN/, RealESRGAN/,       upscale_models/
                               SwinIR/, DAT/
=============  ==============  ==========================  ==============

Diffusers model folders (with ``model_index.json``) are found anywhere under a root. Files are
named by their path relative to their kind's folder, without the extension (``sub/name``), as
A1111 shows them. Listing reads directory entries only (no hashing, no weights), so it can run on
every refresh.

Names that come from the web UI or the API must stay inside these folders: :func:`check_name`
refuses absolute paths, ``~``, ``..``, backslashes and drive letters, and :func:`resolve_in_root`
also refuses a symbolic link that leads outside. A symbolic link *to* a whole kind folder (for
example ``models/checkpoints -> /data/sd``) is fine: that folder's real location is allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from webui.atomic import write_text_atomic
from webui.engine.context import ModelEntry
from webui.errors import InvalidRequestError, ModelNotFoundError

__all__ = [
    "HUB_ID",
    "KINDS",
    "KIND_FOLDERS",
    "KIND_SUFFIXES",
    "ModelFolders",
    "cached_sha256",
    "check_name",
    "default_cache_dir",
    "file_sha256",
    "model_hash",
    "models_root",
    "resolve_in_root",
]

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("checkpoint", "vae", "controlnet", "lora", "embedding", "upscaler")

KIND_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("checkpoints", "Stable-diffusion"),
    "vae": ("vae", "VAE"),
    "controlnet": ("controlnet", "ControlNet"),
    "lora": ("lora", "loras", "Lora", "LyCORIS"),
    "embedding": ("embeddings",),
    "upscaler": ("upscalers", "upscale_models", "ESRGAN", "RealESRGAN", "SwinIR", "DAT"),
}
"""Folder names per kind, under a models root: ours first, then A1111's and ComfyUI's."""

KIND_SUFFIXES: dict[str, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".ckpt", ".pt", ".pth"),
    "vae": (".safetensors", ".pt", ".ckpt", ".pth"),
    "controlnet": (".safetensors", ".pth", ".pt", ".ckpt"),
    "lora": (".safetensors", ".pt", ".ckpt"),
    "embedding": (".safetensors", ".pt", ".bin"),
    "upscaler": (".safetensors", ".pth", ".pt", ".ckpt"),
}
"""File extensions listed per kind, preferred first. Pickle formats (``.ckpt``, ``.pt``...) are
listed so that choosing one gives the loader's refusal with its reason, not "not found"."""

A1111_EMBEDDINGS = "embeddings"  # A1111 keeps embeddings beside its models folder, not in it
A1111_VAE_MARK = ".vae"  # A1111: "name.vae.safetensors" beside a checkpoint is a VAE, not a checkpoint
FOLDER_MODEL_FILES: dict[str, str] = {"vae": "config.json", "controlnet": "config.json"}
HASH_CACHE_ENV = "LATENT_STUDIO_CACHE_DIR"
HASH_CACHE_NAME = "model-hashes.json"

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A Hugging Face repository id (``org/name``), downloaded when downloads are enabled."""

_DRIVE = re.compile(r"^[A-Za-z]:")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CACHE_LOCK = threading.Lock()
_WARNED: set[str] = set()


# -- names from outside -------------------------------------------------------------------------


def check_name(name: str, what: str = "model") -> str:
    """``name`` as a safe relative path (``/``-separated), or :class:`InvalidRequestError`.

    Refused: empty names, control characters, absolute paths (``/x``, ``//server/x``), ``~``,
    backslashes, drive letters (``C:``) and any ``..`` part. Names from the web UI and the API go
    through this before they touch the file system.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"{what} name must be a non-empty text, got {name!r}")
    reason = None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        reason = "it contains control characters"
    elif "\\" in name:
        reason = "it contains a backslash"
    elif name.startswith("~"):
        reason = "it starts with ~ (a home folder)"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        reason = "it is an absolute path"
    elif _DRIVE.match(name):
        reason = "it names a drive"
    elif ".." in PurePosixPath(name).parts:
        reason = "it contains '..'"
    if reason:
        raise InvalidRequestError(
            f"{what} name {name!r} is not allowed: {reason}. Names are relative to the model folders "
            "(the model list shows them); paths are accepted only on the command line"
        )
    return PurePosixPath(name).as_posix()


def resolve_in_root(
    root: str | Path,
    name: str,
    *,
    suffixes: Iterable[str] = (),
    allowed: Iterable[str | Path] = (),
    what: str = "model",
) -> Path:
    """The real path of ``name`` inside the folder ``root``, for names from the UI or the API.

    ``name`` is checked with :func:`check_name`. With ``suffixes`` (e.g. ``(".safetensors",
    ".pt")``) ``name + suffix`` is tried first, in order, then ``name`` itself, so LoRA and
    embedding names work with or without their extension. The result must lie inside ``root``'s
    real location (or one of the ``allowed`` folders): a symbolic link that leads elsewhere is
    refused with :class:`InvalidRequestError`. Nothing found: :class:`ModelNotFoundError`.
    """
    clean = check_name(name, what)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ModelNotFoundError(f"{what} {name!r} not found: {root} is not a folder")
    bases = [Path(os.path.realpath(base)), *(Path(os.path.realpath(a)) for a in allowed)]
    for candidate in [base / (clean + suffix) for suffix in suffixes] + [base / clean]:
        if not candidate.exists():
            continue
        real = Path(os.path.realpath(candidate))
        if not any(real.is_relative_to(b) for b in bases):
            raise InvalidRequestError(
                f"{what} name {name!r} is not allowed: it leads outside the model folders (through a symbolic link)"
            )
        return real
    raise ModelNotFoundError(f"{what} {name!r} not found in {base}")


# -- the folders --------------------------------------------------------------------------------


def models_root(path: str | Path) -> Path:
    """The models folder of ``path``: ``path`` itself, or ``path/models`` when ``path`` is an
    A1111 or ComfyUI installation (it has ``models/Stable-diffusion`` or ``models/checkpoints``
    but no such folder itself). The result is absolute, symbolic links kept."""
    root = Path(path).expanduser().absolute()
    names = KIND_FOLDERS["checkpoint"]
    if (
        not any((root / n).is_dir() for n in names)
        and not (root / "model_index.json").is_file()
        and any((root / "models" / n).is_dir() for n in names)
    ):
        return root / "models"
    return root


@dataclass(frozen=True)
class ModelFolders:
    """The models roots in order (the first wins when two hold the same name) and their kind folders.

    Build it with :meth:`of`; it is cheap, holds no listing, and every :meth:`scan` reads the
    folders afresh.
    """

    roots: tuple[Path, ...]

    @classmethod
    def of(cls, *dirs: str | Path | None) -> ModelFolders:
        """Roots from folder paths (``None`` and repeats skipped; a tool's install folder is
        taken for its ``models`` folder, see :func:`models_root`)."""
        roots: list[Path] = []
        for folder in dirs:
            if folder is None or str(folder) == "":
                continue
            root = models_root(folder)
            if root not in roots:
                roots.append(root)
        return cls(tuple(roots))

    def kind_folders(self, kind: str, root: Path | None = None) -> list[Path]:
        """The existing folders of ``kind`` (of one root, or of all in order), without repeats
        (``vae`` and ``VAE`` are one folder on a case-insensitive file system)."""
        if kind not in KIND_FOLDERS:
            raise InvalidRequestError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
        found: list[Path] = []
        seen: set[tuple[int, int]] = set()
        for base in [root] if root is not None else self.roots:
            candidates = [base / name for name in KIND_FOLDERS[kind]]
            if kind == "embedding" and any((base / n).is_dir() for n in ("Stable-diffusion", "Lora")):
                candidates.append(base.parent / A1111_EMBEDDINGS)  # A1111: <webui>/embeddings beside models/
            for folder in candidates:
                try:
                    stat = folder.stat()
                except OSError:
                    continue
                key = (stat.st_dev, stat.st_ino)
                if folder.is_dir() and key not in seen:
                    seen.add(key)
                    found.append(folder)
        return found

    def allowed(self) -> tuple[Path, ...]:
        """The real locations that names may lead into: every root and every kind folder."""
        places = [*self.roots, *(f for kind in KINDS for f in self.kind_folders(kind))]
        return tuple(dict.fromkeys(Path(os.path.realpath(p)) for p in places if p.exists()))

    def contains(self, path: str | Path) -> bool:
        """True when ``path``'s real location is inside a root or a kind folder."""
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(base) for base in self.allowed())

    # -- listing --------------------------------------------------------------------------------

    def scan(self, kind: str | None = None) -> list[ModelEntry]:
        """Every model in the folders (of ``kind``, or of all kinds), read from directory entries.

        Per root: diffusers folders (``model_index.json``, named by their path under the root,
        with their ``controlnet/`` subfolder as ``<name>/controlnet``), then each kind's files and
        (for VAE and ControlNet) diffusers folders with ``config.json``. Entries of one root are
        sorted by name, case-insensitively. A name already taken (by an earlier root, or by a
        ``.safetensors`` file of the same name) is listed with its extension, else left out.
        """
        allowed = self.allowed()
        taken: dict[str, set[str]] = {k: set() for k in KINDS}
        entries: list[ModelEntry] = []
        for root in self.roots:
            found: list[ModelEntry] = []
            for names, source, entry_kind in self._root_models(root, kind, allowed):
                name = next((n for n in names if n and n not in taken[entry_kind]), None)
                if name is None:
                    log.debug("%s %s is shadowed by an earlier one of the same name", entry_kind, source)
                    continue
                taken[entry_kind].add(name)
                found.append(ModelEntry(name=name, source=str(source), kind=entry_kind))
            found.sort(key=lambda e: (KINDS.index(e.kind), e.name.lower()))
            entries.extend(found)
        return [e for e in entries if kind is None or e.kind == kind]

    def _root_models(
        self, root: Path, kind: str | None, allowed: tuple[Path, ...]
    ) -> Iterator[tuple[tuple[str | None, ...], Path, str]]:
        """``(names to try, path, kind)`` of the models of one root, in the order they claim names."""
        if not root.is_dir():
            return
        if kind in (None, "checkpoint", "controlnet"):
            for folder in self._diffusers_folders(root, allowed):
                name = folder.relative_to(root).as_posix()
                yield (name,), folder, "checkpoint"
                if (folder / "controlnet" / "config.json").is_file():
                    yield (f"{name}/controlnet",), folder / "controlnet", "controlnet"
        for entry_kind in _kinds_to_scan(kind):
            for base in self.kind_folders(entry_kind, root):
                for name, alternative, source, listed_kind in self._kind_files(entry_kind, base, allowed):
                    yield (name, alternative), source, listed_kind

    def _diffusers_folders(self, root: Path, allowed: tuple[Path, ...]) -> Iterator[Path]:
        for folder, dirs, files in _walk(root, allowed):
            if any(f.name == "model_index.json" for f in files):
                yield folder
                dirs.clear()  # its unet/, vae/... are components, not models

    def _kind_files(
        self, kind: str, base: Path, allowed: tuple[Path, ...]
    ) -> Iterator[tuple[str, str | None, Path, str]]:
        """``(name, name with extension, path, kind)`` of the models in one kind folder."""
        suffixes = KIND_SUFFIXES[kind]
        marker = FOLDER_MODEL_FILES.get(kind)
        for folder, dirs, files in _walk(base, allowed):
            names = {f.name for f in files}
            if "model_index.json" in names:  # a diffusers checkpoint: listed by the root scan
                dirs.clear()
                continue
            if folder != base and marker and marker in names:
                yield folder.relative_to(base).as_posix(), None, folder, kind
                dirs.clear()
                continue
            if folder != base and "config.json" in names and kind in ("checkpoint", "lora", "embedding"):
                dirs.clear()  # some other diffusers component folder: its weights are not this kind
                continue
            ranked = []
            for f in files:
                suffix = Path(f.name).suffix.lower()
                if suffix not in suffixes:
                    continue
                stem = f.name[: -len(suffix)]
                listed_kind = kind
                if kind == "checkpoint" and stem.lower().endswith(A1111_VAE_MARK):
                    listed_kind = "vae"  # A1111's "model.vae.safetensors" beside the checkpoint
                relative = (folder / stem).relative_to(base).as_posix()
                ranked.append((relative.lower(), suffixes.index(suffix), relative, f.name, listed_kind))
            for _, _, relative, filename, listed_kind in sorted(ranked):
                with_ext = (folder / filename).relative_to(base).as_posix()
                yield relative, with_ext, folder / filename, listed_kind

    # -- finding a name -------------------------------------------------------------------------

    def find(self, name: str, kind: str) -> Path:
        """The real path of model ``name`` of ``kind``, for names from the UI or the API.

        Looks in each kind folder (``name`` with or without its extension), then under each root
        (a diffusers folder for checkpoints, a ``config.json`` folder for VAEs and ControlNets).
        Unsafe names: :class:`InvalidRequestError`; nothing there: :class:`ModelNotFoundError`.
        """
        clean = check_name(name, kind)
        allowed = self.allowed()
        suffixes = KIND_SUFFIXES.get(kind, ())
        marker = "model_index.json" if kind == "checkpoint" else FOLDER_MODEL_FILES.get(kind)
        places = [(f, "files") for f in self.kind_folders(kind)]
        if kind == "vae":  # A1111's "model.vae.safetensors" beside its checkpoint
            places += [(f, "vae files") for f in self.kind_folders("checkpoint")]
        places += [(r, "folders") for r in self.roots if r.is_dir()]
        for base, holds in places:
            try:
                path = resolve_in_root(
                    base, clean, suffixes=suffixes if holds != "folders" else (), allowed=allowed, what=kind
                )
            except ModelNotFoundError:
                continue
            if path.is_file() and holds != "folders" and path.suffix.lower() in suffixes:
                vae_file = path.stem.lower().endswith(A1111_VAE_MARK)
                if vae_file if holds == "vae files" else not (kind == "checkpoint" and vae_file):
                    return path
            if path.is_dir() and marker and (path / marker).is_file():
                return path
        raise ModelNotFoundError(f"no {kind} named {name!r} in the model folders")


def _kinds_to_scan(kind: str | None) -> tuple[str, ...]:
    """The kind folders that can hold models of ``kind`` (VAEs also sit beside checkpoints)."""
    if kind is None:
        return KINDS
    if kind not in KIND_FOLDERS:
        return ()
    return ("checkpoint", "vae") if kind == "vae" else (kind,)


def _walk(
    top: Path, allowed: tuple[Path, ...]
) -> Iterator[tuple[Path, list[os.DirEntry[str]], list[os.DirEntry[str]]]]:
    """Like ``os.walk`` (top-down; the caller may prune ``dirs`` in place), with entries sorted by
    name, hidden entries (``.name``) skipped, each real folder visited once, and symbolic links
    followed only when they stay inside ``allowed``."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            stat = folder.stat()
            key = (stat.st_dev, stat.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        dirs: list[os.DirEntry[str]] = []
        files: list[os.DirEntry[str]] = []
        for child in children:
            if child.name.startswith("."):
                continue
            try:
                if child.is_symlink() and not _inside(child.path, allowed):
                    _warn_once(child.path)
                    continue
                if child.is_dir():
                    dirs.append(child)
                elif child.is_file():
                    files.append(child)
            except OSError:
                continue
        yield folder, dirs, files
        stack.extend(Path(d.path) for d in reversed(dirs))


def _inside(path: str, allowed: tuple[Path, ...]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(base) for base in allowed)


def _warn_once(path: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("not listed: %s is a symbolic link that leads outside the model folders", path)


# -- A1111's model hash -------------------------------------------------------------------------


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, as 64 hex digits (reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where computed hashes are kept: ``$LATENT_STUDIO_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/latent-studio``, else ``~/.cache/latent-studio``."""
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latent-studio"


def cached_sha256(path: str | Path, *, cache: str | Path | None = None) -> str:
    """The sha256 of a model file, computed once and then read from a JSON cache.

    The cache (``cache``, default ``default_cache_dir()/model-hashes.json``) maps the file's
    absolute real path to its size, modification time (ns) and sha256; a file whose size or
    time changed is hashed again. The cache is rewritten atomically (a temporary file, then a
    rename), entries of files that no longer exist are dropped, and a cache that cannot be
    written only costs the next call a new hash.
    """
    real = Path(os.path.realpath(Path(path).expanduser()))
    try:
        stat = real.stat()
    except OSError as exc:
        raise ModelNotFoundError(f"cannot hash {path}: {exc.strerror or exc}") from None
    if not real.is_file():
        raise ModelNotFoundError(f"cannot hash {path}: not a file")
    cache_file = Path(cache) if cache is not None else default_cache_dir() / HASH_CACHE_NAME
    key = str(real)
    with _CACHE_LOCK:
        record = _read_cache(cache_file).get(key)
    known = record.get("sha256") if isinstance(record, dict) else None
    if (
        isinstance(record, dict)
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(known, str)
        and _HEX64.match(known)
    ):
        return known
    log.info("computing the sha256 of %s (once; it is cached)", real)
    digest = file_sha256(real)
    with _CACHE_LOCK:
        entries = _read_cache(cache_file)  # again: another process may have added entries meanwhile
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        entries = {k: v for k, v in entries.items() if os.path.exists(k)}
        _write_cache(cache_file, entries)
    return digest


def model_hash(path: str | Path, *, cache: str | Path | None = None) -> str:
    """A1111's "Model hash" of a single-file model: the first 10 hex digits of the file's sha256
    (its "shorthash"), cached as :func:`cached_sha256` describes."""
    return cached_sha256(path, cache=cache)[:10]


def _read_cache(cache_file: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable hash cache %s: %s", cache_file, exc)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return dict(files) if isinstance(files, dict) else {}


def _write_cache(cache_file: Path, entries: dict[str, dict[str, object]]) -> None:
    text = json.dumps({"version": 1, "files": entries}, indent=1, sort_keys=True) + "\n"
    try:
        write_text_atomic(cache_file, text)
    except OSError as exc:
        log.warning("could not write the hash cache %s: %s", cache_file, exc)
