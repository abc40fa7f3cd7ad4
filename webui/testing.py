"""Helpers for testing a plugin, offline and on the CPU, in seconds (plain functions for pytest).

::

    from webui.testing import check_hooks, make_engine, run_task
    import my_plugin

    def test_hooks_match_the_contract():
        check_hooks(my_plugin)  # raises PluginCheckError listing every unknown hook or argument

    def test_each_task_runs():
        engine = make_engine(my_plugin)  # built-ins + my_plugin + a tiny random model
        for task in ("txt2img", "img2img", "inpaint", "seg2img"):
            result = run_task(engine, task, prompt="a cat")
            assert result.images[0].image.size == (64, 64)

The tiny model is random (its images are noise-like, but deterministic for a seed): it is for
checking that a plugin runs, changes what it should and records what it should, not for looking at.
It is built in code (a CLIP BPE tokenizer written to a temporary folder, a 2-block UNet, a VAE and a
ControlNet of a few hundred kilobytes each), so tests need neither downloads nor a models folder.
A plugin with a ControlNet of its own builds one with :func:`tiny_controlnet` and installs it in a
temporary models folder with :func:`save_controlnet`, where the engine lists and loads it by name.
"""

from __future__ import annotations

import difflib
import inspect
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pluggy
import torch
from PIL import Image

from webui import hookspecs
from webui.api import (
    ADE20K,
    API_VERSION,
    Engine,
    GenerationRequest,
    GenerationResult,
    ModelBundle,
    make_plugin_manager,
)
from webui.plugins import API_ATTRIBUTE, api_mismatch

TINY_MODEL = "tiny"  # the name the tiny model has in an engine from make_engine
TINY_CONTROLNET = "tiny-controlnet"  # the name its segmentation ControlNet has there
SIZE = 64  # the tiny model's native size
TASK_DEFAULTS: dict[str, Any] = dict(
    prompt="a red cat", steps=2, seed=1, width=SIZE, height=SIZE, sampler="Euler"
)
CLIP_WORDS = ("the", "cat", "dog", "a", "photo", "of", "red", "blue", "sat", "on", "mat", "painting")


class PluginCheckError(AssertionError):
    """A plugin does not fit the contract (unknown hooks or arguments, another API version)."""


# --- A tiny offline model ---------------------------------------------------------------------


def tiny_bundle(*, controlnet: bool = True, in_channels: int = 4, seed: int = 0) -> ModelBundle:
    """A tiny random SD 1.x-style :class:`~webui.api.ModelBundle` (64×64 native size).

    ``controlnet``: with a small segmentation ControlNet in ``bundle.controlnets["seg"]`` (used by
    seg2img when a request names no ControlNet); ``in_channels=9`` makes an inpainting UNet.
    The global torch random state is left as it was.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory(prefix="latent-studio-tokenizer-") as folder:
        tokenizer = clip_tokenizer(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
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
        )
        controlnets = {}
        if controlnet:
            model = tiny_controlnet(unet, seed=seed)
            model.seg_palette = ADE20K
            controlnets["seg"] = model
    bundle = ModelBundle(
        name=TINY_MODEL,
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
        scheduler_config=dict(
            _class_name="PNDMScheduler",
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            skip_prk_steps=True,
            set_alpha_to_one=False,
        ),
        family="sd1",
        controlnets=controlnets,
        model_hash="0123456789",
    )
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def tiny_controlnet(unet: Any | None = None, *, seed: int = 0, downscale: int = 2) -> Any:
    """A small random diffusers ``ControlNetModel`` for the tiny model, e.g. for a plugin that brings
    its own kind of control image (edges, depth, pose).

    Its encoder is a copy of ``unet`` (default: the UNet of :func:`tiny_bundle`), as ControlNets are
    trained; its output layers, which a real ControlNet starts at zero, are random, so it changes the
    image. Two seeds give two different ControlNets. For an inpainting UNet (9 input channels) it
    takes the latents alone, as inpainting pipelines feed a ControlNet. ``downscale`` is the VAE's
    (2 for the tiny model, 8 for Stable Diffusion's): the control image is brought down to the
    latents' size by as many halvings. The global torch random state is left as it was. Use it in
    code (``engine.models.add(name, model, kind="controlnet")``) or save it into a models folder
    with :func:`save_controlnet`.
    """
    from diffusers import ControlNetModel

    if unet is None:
        unet = tiny_bundle(controlnet=False).unet
    halvings = int(downscale).bit_length() - 1
    if downscale < 1 or 2**halvings != downscale:
        raise ValueError(f"downscale must be a power of 2, got {downscale!r}")
    embedding = tuple(16 * 2**i for i in range(halvings + 1))  # (16, 32) for the tiny model
    latent_channels = unet.config.out_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if unet.config.in_channels == latent_channels:
            model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
        else:  # the UNet also takes the mask and the masked image: copy what fits the latents alone
            shape = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=embedding, load_weights_from_unet=False
            )
            model = ControlNetModel.from_config({**shape.config, "in_channels": latent_channels})
            with torch.no_grad():
                model.conv_in.weight.copy_(unet.conv_in.weight[:, :latent_channels])
                model.conv_in.bias.copy_(unet.conv_in.bias)
            for part in ("time_proj", "time_embedding", "down_blocks", "mid_block"):
                getattr(model, part).load_state_dict(getattr(unet, part).state_dict())
        with torch.no_grad():  # from_unet zeroes the outputs: randomise them so the ControlNet matters
            for name, param in model.named_parameters():
                if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                    param.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def save_controlnet(model: Any, models_dir: str | Path, name: str) -> Path:
    """Save ``model`` (e.g. a :func:`tiny_controlnet`) as a diffusers ControlNet folder,
    ``models_dir/controlnet/name`` (``config.json`` and safetensors weights), and return that folder.

    An engine with ``models_dir=models_dir`` then lists it under ``name`` (the choices of a field
    with ``choices="models:controlnet"``, ``launch.py models``) and loads it by that name
    (``engine.models.get_controlnet(name)``) with the built-in loader, as it would an installed one.
    ``name`` may contain ``/`` for a sub-folder; absolute names and ``..`` are refused.
    """
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"ControlNet name {name!r}: give a relative folder name inside models/controlnet")
    folder = Path(models_dir) / "controlnet" / name
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def clip_tokenizer(folder: str | Path, *, words: tuple[str, ...] = CLIP_WORDS) -> Any:
    """A real CLIP BPE tokenizer (``vocab.json`` and ``merges.txt`` written to ``folder``): the 256
    byte characters and their word-final forms, whole-word merges for ``words``, then
    ``<|startoftext|>`` and ``<|endoftext|>``. Every id is below 1000. Other words are spelled in
    pieces, as CLIP does with rare words."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    merges: list[str] = []
    for word in words:
        steps = [f"{word[:i]} {word[i]}" for i in range(1, len(word) - 1)]
        steps += [f"{word[:-1]} {word[-1]}</w>"] if len(word) > 1 else []
        for merge in steps:
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>", model_max_length=77)


def byte_level_alphabet() -> list[str]:
    """The printable characters byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


# --- Inputs for each task ---------------------------------------------------------------------


def sample_image(width: int = SIZE, height: int = SIZE, seed: int = 0) -> Image.Image:
    """A deterministic RGB image: a colour gradient with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), np.full_like(x, 128)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def sample_mask(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A mask (white = repaint) over the middle of the image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, "L")


def sample_seg_map(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """An ADE20K segmentation map: sky above, a tree bottom left, a person bottom right."""
    classes = np.full((height, width), 2, dtype=np.int64)  # sky
    classes[height // 2 :, : width // 2] = 4  # tree
    classes[height // 2 :, width // 2 :] = 12  # person
    return Image.fromarray(ADE20K.colors[classes].astype(np.uint8), "RGB")


def task_inputs(task: str, width: int = SIZE, height: int = SIZE) -> dict[str, Any]:
    """The images a built-in task needs, sized ``width``×``height`` (nothing for other tasks)."""
    if task == "img2img":
        return {"init_image": sample_image(width, height)}
    if task == "inpaint":
        return {"init_image": sample_image(width, height), "mask": sample_mask(width, height)}
    if task == "seg2img":
        return {"seg_map": sample_seg_map(width, height)}
    return {}


# --- An engine with the plugin ----------------------------------------------------------------


def make_engine(*plugins: Any, bundle: ModelBundle | None = None, **engine_options: Any) -> Engine:
    """An engine with the built-in plugins and ``plugins`` (modules or objects; no installed or
    drop-in plugins), serving ``bundle`` (default: :func:`tiny_bundle`) as its default model
    :data:`TINY_MODEL`, and its segmentation ControlNet as :data:`TINY_CONTROLNET`.

    ``engine_options`` go to :class:`~webui.api.Engine` (``limits``, ``memory``, ``models_dir``…).
    Raises :class:`PluginCheckError` when a plugin could not be registered (a hook that does not
    fit the contract, another API version), with the reason.
    """
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=plugins)
    failed = [
        f"{record.name}: {record.error}"
        for record in pm.records.values()
        if record.source == "extra" and record.error
    ]
    if failed:
        raise PluginCheckError("plugin not registered: " + "; ".join(failed))
    options = {"allow_download": False, "default_model": TINY_MODEL, **engine_options}
    engine = Engine(plugins=pm, **options)
    bundle = bundle if bundle is not None else tiny_bundle()
    engine.models.add(TINY_MODEL, bundle)
    if "seg" in bundle.controlnets:
        engine.models.add(TINY_CONTROLNET, bundle.controlnets["seg"], kind="controlnet")
    return engine


def run_task(engine: Engine, task: str, **fields: Any) -> GenerationResult:
    """Run one request of ``task`` on ``engine`` and return its result.

    The request gets small defaults (:data:`TASK_DEFAULTS`: 2 Euler steps, seed 1, 64×64) and the
    images the task needs (:func:`task_inputs`, at the request's size); ``fields`` override any of
    them (``prompt=``, ``seed=``, ``init_image=``…). A plugin's fields are given by name too
    (``run_task(engine, "sketch2img", sketch=image, sketch_weight=0.5)``: they go to
    ``request.extra``), as is ``extra=`` itself.
    """
    values = {**TASK_DEFAULTS, **fields}
    extra = dict(values.pop("extra", None) or {})
    width, height = values.get("width") or SIZE, values.get("height") or SIZE
    request = engine.fields.new_request(task, {**task_inputs(task, width, height), **values})
    request.extra.update(extra)
    return engine.generate(request)


# --- The web UI, built in-process ---------------------------------------------------------------


def build_ui(engine: Engine, outputs_dir: str | Path | None = None) -> Any:
    """The web app's ``gr.Blocks`` over ``engine``, with every tab its plugins register, built
    in-process (no server, no browser): look at a tab's controls with :func:`ui_components`.
    Images generated through it go to ``outputs_dir`` (default: a new temporary folder)."""
    from webui.ui.app import build_app
    from webui.ui.service import StudioService

    folder = outputs_dir if outputs_dir is not None else tempfile.mkdtemp(prefix="latent-studio-outputs-")
    return build_app(StudioService(engine, folder))


def ui_components(demo: Any) -> dict[str, Any]:
    """The components of a built app by element id (``"sketch2img-sketch-weight"``: a tab's control
    for a field is ``<tab id>-<field name with dashes>``)."""
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def ui_request(engine: Engine, task: str, values: dict[str, Any]) -> GenerationRequest:
    """The request a generation tab of ``task`` sends for its controls' ``values`` (by field name,
    as the controls hold them: a canvas dict, a slider's float...), checked as the web app checks
    them; a bad value raises ``InvalidRequestError`` with the message the user would see."""
    from webui.ui.controls import build_request

    return build_request(task, values, fields=engine.fields)


# --- Hook signatures --------------------------------------------------------------------------


def hook_specs() -> dict[str, tuple[str, ...]]:
    """Every hook of the contract and the names of its arguments."""
    specs = {}
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(function, f"{hookspecs.PROJECT}_spec"):
            specs[name] = tuple(inspect.signature(function).parameters)
    return specs


def hook_problems(plugin: Any) -> list[str]:
    """What is wrong with ``plugin``'s hooks, one line each (empty when nothing is):

    * a ``@hookimpl`` function whose name is no hook (with the closest hook names);
    * an argument that the hook does not have (hooks pass arguments by name);
    * a public function named like a hook but not decorated with ``@hookimpl`` (never called);
    * an :data:`~webui.plugins.API_ATTRIBUTE` declaration without this program's API version;
    * anything pluggy refuses when the plugin is registered.
    """
    specs = hook_specs()
    problems = []
    for attribute, function, options in _members(plugin):
        if options is None:
            if attribute in specs and callable(function):
                problems.append(
                    f"{attribute}: named like a hook but not decorated with @hookimpl, so it is never called"
                )
            continue
        hook = options.get("specname") or attribute
        if hook not in specs:
            close = difflib.get_close_matches(hook, list(specs), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            problems.append(f"{attribute}: no hook is named {hook!r}{hint}")
            continue
        unknown = [name for name in _argument_names(function) if name not in specs[hook]]
        if unknown:
            where = attribute if attribute == hook else f"{attribute} (hook {hook})"
            problems.append(
                f"{where}: no argument {', '.join(map(repr, unknown))}; the hook's arguments are "
                f"{', '.join(specs[hook])}"
            )
    mismatch = api_mismatch(plugin)
    if mismatch is not None:
        problems.append(f"{API_ATTRIBUTE}: {mismatch}")
    if not problems:  # what pluggy itself checks (generator wrappers, historic hooks…)
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(plugin)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            problems.append(" ".join(str(exc).split()))
    return problems


def check_hooks(plugin: Any) -> None:
    """Raise :class:`PluginCheckError` listing every problem :func:`hook_problems` finds."""
    problems = hook_problems(plugin)
    if problems:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        raise PluginCheckError(
            f"plugin {name} does not fit the Latent Studio plugin API {API_VERSION}:\n  "
            + "\n  ".join(problems)
        )


def _members(plugin: Any) -> Iterator[tuple[str, Any, dict[str, Any] | None]]:
    """(attribute name, value, hookimpl options or None) for the plugin's public attributes."""
    marker = f"{hookspecs.PROJECT}_impl"
    for attribute in dir(plugin):
        if attribute.startswith("_"):
            continue
        try:
            value = getattr(plugin, attribute)
        except Exception:
            continue
        if (
            isinstance(plugin, ModuleType)
            and getattr(value, "__module__", plugin.__name__) != plugin.__name__
        ):
            if not hasattr(value, marker):
                continue  # imported into the module, not written there
        options = getattr(value, marker, None)
        yield attribute, value, options if isinstance(options, dict) else None


def _argument_names(function: Any) -> list[str]:
    """The arguments pluggy passes to ``function``: those without defaults (``self`` left out)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
