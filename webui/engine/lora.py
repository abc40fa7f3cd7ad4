"""LoRA networks in the kohya / AUTOMATIC1111 ``.safetensors`` format, applied per request.

Prompt syntax, as in A1111::

    <lora:name>            weight 1.0 for the text encoder(s) and the UNet
    <lora:name:0.8>        weight 0.8 for both
    <lora:name:0.8:0.5>    0.8 for the text encoder(s), 0.5 for the UNet (A1111's order)
    <lora:name:te=0.8:unet=0.5>   the same, named

``<lyco:...>`` is an alias of ``<lora:...>``, as in A1111. Every ``<type:...>`` tag is taken out of
the positive prompt before it is encoded (so the tag never reaches the text encoder), and the image's
``parameters`` text keeps the prompt as written, tags included. The negative prompt is not parsed for
tags, as in A1111: a tag there applies nothing and is encoded as ordinary text. The same LoRA named
twice applies once with the summed weights (the delta of a LoRA is linear in its weight). A1111's
``dyn`` (rank truncation) is not supported and is refused.

A name is looked up among the models listed with kind ``"lora"`` (``models/lora/`` and the
A1111/ComfyUI folder names, see :mod:`webui.engine.folders`): by name (subfolders allowed:
``<lora:styles/ink:0.7>``), then by file stem. A name is never a path: the folders' name rules apply.

Loading: the file's kohya keys (``lora_unet_*``, ``lora_te_*``, SDXL's ``lora_te1_*``/``lora_te2_*``,
``.lora_down``/``.lora_up``/``.alpha``) are converted to diffusers module names by diffusers' own
converter, each layer's ``alpha / rank`` scale is folded into its up weights, and the layers are
injected with peft as one adapter per LoRA; the request's weights are the adapters' scales. On leaving
:func:`apply_loras` (normally, on an error, or after an interrupt) every adapter layer is replaced by
the original module object it wrapped, so the model is exactly what it was before: same modules, same
tensors, bit-for-bit the same outputs.

In a generation the LoRAs are a model patch: the built-in plugin :mod:`webui.builtin.lora` reads the
prompt's tags in the ``patch_model`` hook and hands :func:`apply_loras` to the engine. The model bundle
is cached and shared by all requests, so a request holds the model's lock
(:func:`webui.engine.models.model_lock`, also named :func:`bundle_lock` here) for as long as its LoRAs
are applied (the engine holds it for the whole generation, LoRAs or not): two generations on one model
never see each other's LoRAs. Injecting takes a few milliseconds per layer
(about a second for a full SD 1.5 LoRA on a CPU), paid per request; the file itself is read once and
cached.

Also read: diffusers-format LoRAs (``unet.*.lora_A.weight`` ...) at scale 1. Refused with a message:
pickle files, LyCORIS variants other than plain LoRA (LoHa, LoKr, IA3, OFT, full diffs), DoRA, and
LoRAs none of whose layers exist in the model. The image's ``parameters`` get A1111's
``Lora hashes: "name: hash, ..."`` (see :class:`LoraFile` for the hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from webui.engine.bundle import ModelBundle
from webui.engine.files import FileCache
from webui.engine.folders import check_name
from webui.engine.models import model_lock
from webui.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
LORA_TYPES = ("lora", "lyco")  # A1111 registers "lyco" as an alias of "lora"
STATE_KEY = "loras"  # RunContext.state key of a request's LoRAs (set by webui.builtin.lora)
ADAPTER_PREFIX = "latent_studio_lora_"
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax; use _sub_tags
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_UNSUPPORTED_MARKERS = {
    "dora_scale": "DoRA",
    "hada_w1": "LoHa",
    "lokr_w1": "LoKr",
    ".on_input": "IA3",
    ".diff": "full-difference (diff)",
    ".oft_": "OFT",
}
_CACHE_SIZE = 4
_LISTED_NAMES = 40  # names shown in the message for an unknown LoRA


# -- prompt tags -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag of a prompt: the name and A1111's two multipliers."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    text: str = ""


def _number(value: str, tag: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequestError(f"{tag}: the {what} {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise InvalidRequestError(f"{tag}: the {what} must be a finite number, got {value.strip()!r}")
    return number


def _shown(tag: str, limit: int = 80) -> str:
    """A tag as an error message quotes it: one line, at most ``limit`` characters."""
    tag = " ".join(tag.split())
    return tag if len(tag) <= limit else tag[: limit - 1] + "…"


def _lora_tag(args: str, tag: str) -> LoraTag:
    text = _shown(tag)  # for messages
    items = args.split(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise InvalidRequestError(f"{text}: a LoRA tag needs a name, as in <lora:name:0.8>")
    if len(positional) > 3 or "dyn" in named:
        raise InvalidRequestError(
            f"{text}: A1111's dyn (rank truncation) is not supported; use <lora:name:weight>"
        )
    unknown = set(named) - {"te", "unet"}
    if unknown:
        raise InvalidRequestError(f"{text}: unknown option {min(unknown)!r}; the options are te= and unet=")
    te = _number(positional[1], text, "weight") if len(positional) > 1 else 1.0
    te = _number(named["te"], text, "te weight") if "te" in named else te
    unet = _number(positional[2], text, "UNet weight") if len(positional) > 2 else te
    unet = _number(named["unet"], text, "unet weight") if "unet" in named else unet
    return LoraTag(name=name, te_weight=te, unet_weight=unet, text=tag)


def _sub_tags(replace: Callable[[re.Match[str]], str], prompt: str) -> str:
    """``EXTRA_NETWORK_TAG.sub(replace, prompt)`` in time linear in ``len(prompt)``.

    A tag ends with ``>``, so none can start after the last ``>``; the pattern is run only on the
    text up to it. There, a ``<name:`` that is not a tag's start fails before the next ``>``, while
    after the last ``>`` each of ``"<a:" * n`` would scan to the end of the prompt (quadratic time).
    """
    cut = prompt.rfind(">") + 1
    return EXTRA_NETWORK_TAG.sub(replace, prompt[:cut]) + prompt[cut:]


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Take A1111's extra-network tags out of ``prompt``: the prompt without them and its LoRA tags.

    Raises :class:`InvalidRequestError` for a malformed ``<lora:...>`` tag and for extra-network
    types other than LoRA (hypernetworks and the like are not supported, so they are not silently
    dropped either).
    """
    tags: list[LoraTag] = []
    unsupported: list[str] = []

    def take(match: re.Match[str]) -> str:
        kind = match.group(1)
        if kind.lower() in LORA_TYPES:
            tags.append(_lora_tag(match.group(2), match.group(0)))
        else:
            unsupported.append(match.group(0))
        return ""

    text = _sub_tags(take, prompt)
    if unsupported:
        raise InvalidRequestError(
            f"{_shown(unsupported[0])}: only LoRA extra networks are supported (<lora:name:weight>)"
        )
    return text, tags


def strip_network_tags(prompt: str) -> str:
    """``prompt`` without its ``<type:...>`` extra-network tags (what the text encoder sees)."""
    return _sub_tags(lambda _match: "", prompt)


# -- finding and reading files ---------------------------------------------------------------------


def _listed(models: Any) -> list[tuple[str, Path]]:
    """``(name, path)`` of the LoRA files the model listing offers."""
    return [
        (str(entry.name), Path(str(entry.source)))
        for entry in models.list("lora")
        if Path(str(entry.source)).is_file()
    ]


def available_loras(models: Any) -> list[str]:
    """The LoRA names a request may use."""
    return sorted({name for name, path in _listed(models) if path.suffix.lower() == LORA_SUFFIX})


def find_lora(name: str, models: Any) -> Path:
    """The file of the LoRA called ``name``: a listed LoRA of that name, else one whose file stem is
    ``name`` (as A1111 finds ``<lora:ink>`` in a subfolder).

    An unsafe name (a path) or an unknown one raises :class:`InvalidRequestError`; the latter lists
    the LoRAs there are.
    """
    check_name(name, "LoRA")
    listed = _listed(models)
    for candidates in (
        [path for entry_name, path in listed if entry_name == name],
        [path for _, path in listed if path.stem == name],
    ):
        safe = [path for path in candidates if path.suffix.lower() == LORA_SUFFIX]
        if safe:
            return safe[0]
        if candidates:
            raise InvalidRequestError(
                f"LoRA {name!r} is a {candidates[0].suffix} file; only .safetensors LoRAs are loaded "
                "(pickle files can run code when loaded)"
            )
    available = available_loras(models)
    listing = (
        ", ".join(available[:_LISTED_NAMES])
        if available
        else "none (put .safetensors LoRA files into models/lora/)"
    )
    if len(available) > _LISTED_NAMES:
        listing += f" and {len(available) - _LISTED_NAMES} more"
    raise InvalidRequestError(f"unknown LoRA {name!r}; available LoRAs: {listing}")


@dataclass(frozen=True)
class LoraFile:
    """The tensors of one LoRA file, with A1111's short hash of it.

    ``hash``: the ``sshs_model_hash`` that kohya's trainer writes into the metadata, else the sha256 of
    the tensor data after the safetensors header (the "addnet" hash); 12 hex digits, as A1111 writes
    them into ``Lora hashes``.
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    hash: str
    metadata: dict[str, str] = field(default_factory=dict)


_files = FileCache(_CACHE_SIZE)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (pickles are refused: they can run code when loaded).

    The last few files read are cached by path, size and modification time.
    """
    path = Path(path)
    if path.suffix.lower() != LORA_SUFFIX:
        raise InvalidRequestError(f"LoRA {path.name}: only .safetensors LoRAs are loaded")
    return _files.get(path, _read_lora_file, what=f"LoRA {path.name}")


def _read_lora_file(path: Path) -> LoraFile:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        tensors = load(data)
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelLoadError(f"LoRA {path.name} is not a readable .safetensors file ({exc})") from exc
    metadata = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    digest = str(metadata.get("sshs_model_hash") or hashlib.sha256(data[8 + header_size :]).hexdigest())
    return LoraFile(path=path, tensors=tensors, hash=digest[:12], metadata=dict(metadata))


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA to apply to one request: the name as written in the prompt, its file, its weights."""

    name: str
    file: LoraFile
    te_weight: float = 1.0
    unet_weight: float = 1.0


def prompt_loras(prompt: str, models: Any) -> list[LoraRequest]:
    """The LoRAs that ``prompt``'s tags ask for, found and read (one entry per LoRA, in order of first
    mention; repeated tags add up their weights)."""
    _, tags = parse_lora_tags(prompt)
    merged: dict[str, list[float]] = {}
    for tag in tags:
        weights = merged.setdefault(tag.name, [0.0, 0.0])
        weights[0] += tag.te_weight
        weights[1] += tag.unet_weight
    return [
        LoraRequest(name=name, file=read_lora(find_lora(name, models)), te_weight=te, unet_weight=unet)
        for name, (te, unet) in merged.items()
    ]


def lora_metadata(loras: Sequence[LoraRequest]) -> dict[str, str]:
    """``{"Lora hashes": "name: hash, ..."}`` as A1111 writes it (``:`` and ``,`` dropped from the
    names so the value parses back), or ``{}`` without LoRAs."""
    if not loras:
        return {}
    items = [f"{lora.name.replace(':', '').replace(',', '')}: {lora.file.hash}" for lora in loras]
    return {"Lora hashes": ", ".join(items)}


# -- converting kohya keys to the modules of a bundle ----------------------------------------------


def _refuse_unsupported(tensors: dict[str, torch.Tensor], name: str) -> None:
    for marker, kind in _UNSUPPORTED_MARKERS.items():
        if any(marker in key for key in tensors):
            raise InvalidRequestError(
                f"LoRA {name!r} is a {kind} network; only plain LoRAs (lora_down/lora_up) are supported"
            )


def _fold_alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya tensors with each layer's ``alpha / rank`` multiplied into its up weights (float32) and
    the ``.alpha`` entries dropped, so every layer's scale is exactly its request weight."""
    folded: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            base = key[: -len(".lora_up.weight")]
            down = tensors.get(f"{base}.lora_down.weight")
            alpha = tensors.get(f"{base}.alpha")
            value = value.to(torch.float32)
            if down is not None and alpha is not None:
                value = value * (float(alpha) / down.shape[0])
        elif key.endswith(".lora_down.weight"):
            value = value.to(torch.float32)
        folded[key] = value
    return folded


def _refuse_own_scaling(lora: LoraFile, name: str) -> None:
    """A diffusers-format LoRA is applied with scale 1 per layer (``lora_alpha == r``, diffusers'
    convention when a file says nothing else); one whose ``lora_adapter_metadata`` asks for another
    scale is refused rather than applied at the wrong strength."""
    text = lora.metadata.get("lora_adapter_metadata")
    if not text:
        return
    try:
        config = json.loads(text)
    except ValueError:
        return
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        rank, alpha = config.get(f"{prefix}.r"), config.get(f"{prefix}.lora_alpha")
        special = config.get(f"{prefix}.alpha_pattern") or config.get(f"{prefix}.use_rslora")
        if special or (rank is not None and alpha is not None and rank != alpha):
            raise InvalidRequestError(
                f"LoRA {name!r} is a diffusers LoRA with its own scaling (lora_alpha {alpha}, rank {rank}); "
                "only kohya-format LoRAs and diffusers LoRAs of scale 1 are supported"
            )


def _diffusers_state_dict(lora: LoraFile, name: str, unet_config: Any) -> dict[str, torch.Tensor]:
    """The LoRA in diffusers' naming (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    tensors = lora.tensors
    _refuse_unsupported(tensors, name)
    kohya = all(key.startswith(_KOHYA_PREFIXES) for key in tensors)
    if not kohya:
        _refuse_own_scaling(lora, name)
    state = _fold_alphas(tensors) if kohya else dict(tensors)
    try:
        converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            state, unet_config=unet_config if kohya else None
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InvalidRequestError(
            f"LoRA {name!r} is not in a LoRA format Latent Studio can read ({exc})"
        ) from exc
    if alphas:
        raise InvalidRequestError(f"LoRA {name!r} carries alphas in a layout that is not supported")
    return converted


def _peft_keys(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """One component's part of a diffusers-named LoRA, in peft's naming (``<module>.lora_A.weight``).

    diffusers' kohya converter names text-encoder attention layers the old way (``to_q_lora``) and
    MLP layers the new way (``lora_linear_layer``); the old-to-peft mapping handles both, and is
    given explicitly because diffusers' guess needs an ``out_proj`` layer to be present.
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    prefix = f"{component}."
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not part or any(".lora_A." in k for k in part):
        return part
    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    converted = convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS_OLD)
    return {
        k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in converted.items()
    }


def _module_name(key: str) -> str:
    return key.split(".lora_", 1)[0]


def _match_modules(
    part: dict[str, torch.Tensor], module_names: set[str]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``part`` keyed by the model's own module names (CLIP's ``text_model.`` prefix added or dropped
    as this transformers version names its modules), and the module names that matched nothing."""
    renamed: dict[str, torch.Tensor] = {}
    missing: set[str] = set()
    for key, value in part.items():
        module = _module_name(key)
        rest = key[len(module) :]
        candidates = [module, module.removeprefix("text_model."), f"text_model.{module}"]
        target = next((c for c in candidates if c in module_names), None)
        if target is None:
            missing.add(module)
            continue
        renamed[target + rest] = value
    return renamed, missing


@dataclass
class _Component:
    label: str
    module: torch.nn.Module
    weight_attr: str  # "te_weight" or "unet_weight"


def _components(bundle: ModelBundle) -> dict[str, _Component]:
    parts = {"unet": _Component("UNet", bundle.unet, "unet_weight")}
    for index, encoder in enumerate(bundle.text_encoders[:2]):
        key = "text_encoder" if index == 0 else "text_encoder_2"
        parts[key] = _Component(f"text encoder {index + 1}", encoder, "te_weight")
    return {k: v for k, v in parts.items() if isinstance(v.module, torch.nn.Module)}


def lora_layers(lora: LoraRequest, bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    """The peft state dict of ``lora`` for each component of ``bundle`` it has layers for
    (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``), keyed by the component's module names.

    Raises :class:`InvalidRequestError` when none of its layers exists in the model (a LoRA made for
    another model family); layers that are missing while others match are logged and skipped.
    """
    components = _components(bundle)
    unet_config = getattr(bundle.unet, "config", None)  # maps kohya's SDXL (sgm) block names
    state = _diffusers_state_dict(lora.file, lora.name, unet_config)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    total_missing: set[str] = set()
    for key, component in components.items():
        part = _peft_keys(state, key)
        if not part:
            continue
        names = {name for name, _ in component.module.named_modules()}
        matched, missing = _match_modules(part, names)
        total_missing |= {f"{key}.{m}" for m in missing}
        if matched:
            layers[key] = matched
    if not layers:
        raise InvalidRequestError(
            f"LoRA {lora.name!r} does not fit the model {bundle.name!r}: none of its layers exists in it "
            "(is it made for another model family, e.g. SDXL vs SD 1.x?)"
        )
    if total_missing:
        log.warning(
            "LoRA %r: %d of its layers are not in the model %r and are skipped (e.g. %s)",
            lora.name,
            len(total_missing),
            bundle.name,
            sorted(total_missing)[0],
        )
    return layers


# -- applying and removing -------------------------------------------------------------------------


bundle_lock = model_lock  # the lock lives with the model cache (webui.engine.models); kept under this name


def _lora_config(layers: dict[str, torch.Tensor]) -> Any:
    from peft import LoraConfig

    ranks = {_module_name(key): int(value.shape[0]) for key, value in layers.items() if ".lora_A." in key}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(name)}": r for name, r in ranks.items() if r != rank}
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # alpha / rank is folded into the up weights: every layer's scale is 1
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
    )


def _has_adapter_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _inject(module: torch.nn.Module, adapter: str, layers: dict[str, torch.Tensor]) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    # peft keeps one ``peft_config`` dict on the module and warns when a second adapter finds it;
    # each adapter is injected on its own and the configs are merged back afterwards
    earlier = vars(module).pop("peft_config", None)
    try:
        inject_adapter_in_model(_lora_config(layers), module, adapter_name=adapter, low_cpu_mem_usage=True)
        result = set_peft_model_state_dict(module, layers, adapter_name=adapter, low_cpu_mem_usage=True)
    finally:
        if earlier is not None:
            vars(module)["peft_config"] = {**earlier, **vars(module).get("peft_config", {})}
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and adapter in k]
    if unexpected or missing:
        raise ModelLoadError(
            f"LoRA layers did not load cleanly ({len(unexpected)} unexpected, {len(missing)} missing, "
            f"e.g. {(unexpected or missing)[0]})"
        )


def _activate(module: torch.nn.Module, weights: dict[str, float]) -> None:
    """Make exactly the adapters in ``weights`` active on every adapter layer, each scaled by its
    weight (the layers were configured with scale 1)."""
    from peft.tuners.lora import LoraLayer  # the only kind of layer injected here (plain LoRA)

    for layer in module.modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [name for name in weights if name in getattr(layer, "scaling", {})]
        layer.set_adapter(present)
        for name in present:
            layer.set_scale(name, weights[name])


def _unwrap(module: torch.nn.Module) -> None:
    """Put back the original module object in place of every adapter layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if not name or not isinstance(layer, BaseTunerLayer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(parent, BaseTunerLayer):
            continue
        setattr(parent, child, layer.get_base_layer())


_PEFT_ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")  # what peft sets on the module it adapts


@dataclass
class _Snapshot:
    """What injecting adapters changes on a module besides its submodules, to undo it exactly."""

    module: torch.nn.Module
    attributes: dict[str, Any]
    requires_grad: list[tuple[torch.nn.Parameter, bool]]
    training: list[tuple[torch.nn.Module, bool]]

    @classmethod
    def take(cls, module: torch.nn.Module) -> _Snapshot:
        own = vars(module)
        return cls(
            module=module,
            attributes={name: own[name] for name in _PEFT_ATTRIBUTES if name in own},
            requires_grad=[(p, p.requires_grad) for p in module.parameters()],
            training=[(m, m.training) for m in module.modules()],
        )

    def restore(self) -> None:
        _unwrap(self.module)
        own = vars(self.module)
        for name in _PEFT_ATTRIBUTES:
            if name in self.attributes:
                own[name] = self.attributes[name]
            else:
                own.pop(name, None)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for sub, flag in self.training:
            sub.training = flag


@contextmanager
def apply_loras(bundle: ModelBundle, loras: Sequence[LoraRequest]) -> Iterator[list[LoraRequest]]:
    """Apply ``loras`` to ``bundle`` for the duration of the ``with`` block, then remove them.

    Holds the model's lock (:func:`~webui.engine.models.model_lock`) throughout. LoRAs whose weight
    for a component is 0 are not loaded into it (a weight of 0 is exactly no LoRA). On exit, normal or
    not, every component is restored to its original module objects and flags. Yields the LoRAs
    applied.
    """
    active = [lora for lora in loras if lora.te_weight != 0 or lora.unet_weight != 0]
    with model_lock(bundle):
        if not active:
            yield list(loras)
            return
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError("LoRAs need the peft package: pip install peft") from exc
        components = _components(bundle)
        for component in components.values():
            if _has_adapter_layers(component.module):
                raise ModelLoadError(
                    f"the {component.label} of {bundle.name!r} already holds adapter layers that were not "
                    "added for this request; LoRAs cannot be applied to it safely"
                )
        plans = [(index, lora, lora_layers(lora, bundle)) for index, lora in enumerate(active)]
        snapshots: dict[str, _Snapshot] = {}
        try:
            for key, component in components.items():
                weights: dict[str, float] = {}
                for index, lora, layers in plans:
                    weight = float(getattr(lora, component.weight_attr))
                    if key not in layers or weight == 0:
                        continue
                    if key not in snapshots:
                        snapshots[key] = _Snapshot.take(component.module)
                    adapter = f"{ADAPTER_PREFIX}{index}"
                    try:
                        _inject(component.module, adapter, layers[key])
                    except (ValueError, RuntimeError, KeyError) as exc:
                        raise InvalidRequestError(
                            f"LoRA {lora.name!r} does not fit the {component.label} of {bundle.name!r}: {exc}"
                        ) from exc
                    weights[adapter] = weight
                if weights:
                    _activate(component.module, weights)
            yield list(loras)
        finally:
            errors = []
            for snapshot in snapshots.values():
                try:
                    snapshot.restore()
                except Exception as exc:  # restore the other components before reporting
                    errors.append(exc)
            if errors:
                raise ModelLoadError(f"removing LoRA layers failed: {errors[0]}") from errors[0]


__all__ = [
    "LoraFile",
    "LoraRequest",
    "LoraTag",
    "apply_loras",
    "available_loras",
    "bundle_lock",
    "find_lora",
    "lora_layers",
    "lora_metadata",
    "parse_lora_tags",
    "prompt_loras",
    "read_lora",
    "strip_network_tags",
]
