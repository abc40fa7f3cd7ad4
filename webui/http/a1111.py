"""AUTOMATIC1111's API shapes: its request bodies to a :class:`~webui.request.GenerationRequest`,
and the request's results back to its answers (base64 PNGs, ``parameters``, ``info``).

What is accepted (see the compatibility table in docs/http-api.md):

* A1111's keys for what this engine does (``prompt``, ``steps``, ``sampler_name`` + ``scheduler``,
  ``n_iter``, ``denoising_strength``, ``init_images``, ``mask``, ``inpainting_fill``...) map onto the
  built-in fields;
* plugin fields under their registered names (``cfg_rescale``...), checked by their declaration;
* ``override_settings`` with ``sd_model_checkpoint``, ``sd_vae``, ``CLIP_stop_at_last_layers`` and
  ``samples_save``, for this request only;
* the ControlNet extension's ``alwayson_scripts.controlnet.args`` (module ``none``: the image is a
  ready segmentation map) drives the segmentation ControlNet.

A1111 keys for features this engine lacks (hires fix, face restoration, tiling, subseeds...) are
accepted at their "off" values, which is what clients send by default, and refused with 422 and a
one-line reason when switched on. Any other key is refused with 422 naming it: A1111 ignores unknown
keys, but a misspelt plugin field silently ignored would give a different image than asked for.

Images arrive as base64 (optionally a ``data:image/...;base64,`` URL); each is checked from its
header against the pixel cap before it is decoded, and never read from a path on the server.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import math
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from webui.errors import InvalidRequestError, LatentStudioError, ModelNotFoundError

__all__ = ["ApiProblem", "Parsed", "decode_image", "encode_png", "info_of", "parse_body", "split_hash"]

MAX_BASE64_CHARS = 200 * 1024 * 1024  # also bounded by the request body limit


class ApiProblem(LatentStudioError):
    """An answer other than 422: ``status`` (404 for an unknown model or sampler...) and one line."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# A1111 keys mapped onto built-in fields (value converters below)
_DIRECT = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "cfg_scale": "cfg_scale",
    "width": "width",
    "height": "height",
    "batch_size": "batch_size",
    "n_iter": "batch_count",
    "eta": "eta",
    "mask_blur": "mask_blur",
    "inpaint_full_res_padding": "only_masked_padding",
}
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")  # A1111's 0..3
_HANDLED = {
    "sampler_name",
    "sampler_index",
    "scheduler",
    "denoising_strength",
    "init_images",
    "mask",
    "inpainting_fill",
    "inpaint_full_res",
    "inpainting_mask_invert",
    "include_init_images",
    "override_settings",
    "override_settings_restore_afterwards",
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "alwayson_scripts",
    "script_name",
    "script_args",
    "task",
    "mask_blur_x",
    "mask_blur_y",
}


def _off(*values: Any) -> Any:
    return lambda value: value in values


_ANY = lambda value: True  # noqa: E731 - a table of one-line checks reads best as lambdas

# A1111 keys for features this engine lacks: accepted while "off" (as clients send them by default)
_INERT: dict[str, Any] = {
    "restore_faces": _off(False, None, 0),
    "tiling": _off(False, None, 0),
    "subseed": _ANY,
    "subseed_strength": _off(0, 0.0, None),
    "seed_resize_from_h": _off(-1, 0, None),
    "seed_resize_from_w": _off(-1, 0, None),
    "s_churn": _ANY,
    "s_tmax": _ANY,
    "s_tmin": _ANY,
    "s_noise": _ANY,
    "s_min_uncond": _ANY,
    "refiner_checkpoint": _off(None, "", "None"),
    "refiner_switch_at": _ANY,
    "disable_extra_networks": _off(False, None),
    "comments": _ANY,
    "infotext": _ANY,
    "force_task_id": _ANY,
    "firstpass_image": _off(None, ""),
    "hr_checkpoint_name": _off(None, "", "Use same checkpoint"),
    "hr_scheduler": _off(None, "", "Use same scheduler", "Automatic"),
    "hr_additional_modules": _ANY,
    "firstphase_width": _ANY,
    "firstphase_height": _ANY,
    "denoising_strength_hr": _ANY,
    "resize_mode": _off(0, None),
    "image_cfg_scale": _ANY,
    "initial_noise_multiplier": _off(1, 1.0, None),
    "latent_mask": _off(None, ""),
    "inpainting_mask_weight": _ANY,
    "use_async": _off(False, None),
    "use_deprecated_controlnet": _off(False, None),
    "sampler_index_hr": _ANY,
    "extra_generation_params": _ANY,
}
_INERT_REASON = {
    "hr_checkpoint_name": "another checkpoint for the hires pass",
    "hr_scheduler": "another schedule type for the hires pass",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "subseed_strength": "variation seeds",
    "seed_resize_from_h": "seed resizing",
    "seed_resize_from_w": "seed resizing",
    "refiner_checkpoint": "a refiner",
    "firstpass_image": "hires fix",
    "resize_mode": "resize modes other than 0 (just resize)",
    "initial_noise_multiplier": "an initial noise multiplier",
    "latent_mask": "a separate latent mask",
    "use_async": "async calls",
    "disable_extra_networks": "turning extra networks off",
    "use_deprecated_controlnet": "the deprecated ControlNet route",
}

OPTION_KEYS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "samples_save", "outdir_samples")
_OVERRIDES = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "samples_save")
_CONTROLNET_INERT = {
    "resize_mode",
    "processor_res",
    "threshold_a",
    "threshold_b",
    "pixel_perfect",
    "lowvram",
    "low_vram",
    "guessmode",
    "control_mode",
    "input_mode",
    "batch_images",
    "save_detected_map",
    "hr_option",
    "is_ui",
    "advanced_weighting",
    "effective_region_mask",
    "inpaint_crop_input_image",
}
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\Z")


@dataclass
class Parsed:
    """An A1111 body read: the request, and how to answer."""

    request: Any
    save: bool = False
    send_images: bool = True
    init_images: list[str] = field(default_factory=list)  # as sent, for include_init_images
    include_init_images: bool = False
    echo: dict[str, Any] = field(default_factory=dict)  # ``parameters`` in the answer
    grids_only: bool = False  # an X/Y/Z plot without "include sub images": the grids alone


def split_hash(name: str) -> str:
    """A1111's model titles carry the hash: ``"model [abcd1234]"`` -> ``"model"``."""
    return _HASH.sub("", name)


# -- images ----------------------------------------------------------------------------------


def decode_image(value: Any, subject: str) -> Image.Image:
    """A base64 image (a ``data:`` URL or the bare base64 of a PNG/JPEG/WebP file) as a decoded
    PIL image. Not text, not base64, not an image, over the pixel cap: :class:`InvalidRequestError`
    with one line naming ``subject``. A file name is never opened."""
    from webui.images import MAX_PIXELS, check_pixels

    if not isinstance(value, str):
        raise InvalidRequestError(f"{subject} must be a base64-encoded image, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequestError(f"{subject} is a data URL without base64 data")
    if not text:
        raise InvalidRequestError(f"{subject} is empty")
    if len(text) > MAX_BASE64_CHARS:
        raise InvalidRequestError(f"{subject} is too large")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            f"{subject} is not valid base64 (send the image file's bytes in base64)"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))  # reads the header only
            check_pixels(*image.size, subject)
            image.load()
        except InvalidRequestError:
            raise
        except Image.DecompressionBombError:
            raise InvalidRequestError(f"{subject} is too large (more than {MAX_PIXELS} pixels)") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error):
            raise InvalidRequestError(f"{subject} is not a readable image") from None
    return image


def encode_png(image: Any, infotext: str | None = None) -> str:
    """``image`` (a PIL image, or the path of a saved PNG, sent as it is on disk) as base64 PNG
    with the ``parameters`` chunk."""
    if isinstance(image, str):
        with open(image, "rb") as handle:
            return base64.b64encode(handle.read()).decode("ascii")
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def png_bytes(image: Any, infotext: str | None = None) -> bytes:
    """A PNG file's bytes for ``image`` (a path: the file as saved), with its infotext."""
    if isinstance(image, str):
        with open(image, "rb") as handle:
            return handle.read()
    from webui.output import _png_info, _png_ready

    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG", pnginfo=_png_info(infotext))
    return buffer.getvalue()


# -- bodies ----------------------------------------------------------------------------------


def parse_body(body: Any, route: str, engine: Any, options: Mapping[str, Any]) -> Parsed:
    """An A1111 ``txt2img``/``img2img`` body (``route``) as a checked request.

    ``options`` are the caller's settings (``/sdapi/v1/options``), under ``override_settings``.
    Raises :class:`InvalidRequestError` (422) or :class:`ApiProblem` (404: unknown model, VAE,
    sampler or ControlNet) with one line.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    fields = engine.fields
    plugin_fields = {declared.name: declared for declared in fields.plugin_fields()}
    values: dict[str, Any] = {}
    for key, value in body.items():
        if not isinstance(key, str):
            raise InvalidRequestError("every key must be text")
        if key in _DIRECT:
            values[_DIRECT[key]] = value
        elif key in _HANDLED:
            continue
        elif key in _INERT:
            if not _INERT[key](value) and not (
                key.startswith(("hr_", "firstphase_")) and not body.get("enable_hr")
            ):
                what = _INERT_REASON.get(key, key)
                raise InvalidRequestError(
                    f"{key}: {what} is not supported by this server; leave it at its default"
                )
        elif key in plugin_fields:
            declared = plugin_fields[key]
            if value is None and not declared.nullable:
                continue  # A1111 clients send null for "the default" (hr_upscaler, ...)
            values[key] = (
                decode_image(value, key) if declared.kind == "image" and value is not None else value
            )
        else:
            raise InvalidRequestError(_unknown_key(key, route, list(plugin_fields)))
    overrides = dict(options)
    given = body.get("override_settings") or {}
    if not isinstance(given, dict):
        raise InvalidRequestError("override_settings must be a JSON object")
    for key, value in given.items():
        if key not in _OVERRIDES:
            raise InvalidRequestError(
                f"override_settings: {str(key)[:60]!r} is not supported; use {', '.join(_OVERRIDES)}"
            )
        overrides[key] = value
    _apply_settings(values, overrides)
    values["sampler"] = _sampler(body, engine)
    plot, grids_only = _script(body.get("script_name"), body.get("script_args"), route)
    values.update(plot)
    init_images: list[str] = []
    task = "txt2img"
    if route == "img2img":
        init_images = body.get("init_images") or []
        if not isinstance(init_images, list) or not init_images:
            raise InvalidRequestError("img2img needs init_images: a list with one base64-encoded image")
        values["init_image"] = decode_image(init_images[0], "init_images[0]")
        if "denoising_strength" in body and body["denoising_strength"] is not None:
            values["strength"] = body["denoising_strength"]
        task = "img2img"
        if body.get("mask") is not None:
            task = "inpaint"
            values["mask"] = decode_image(body["mask"], "mask")
            values["masked_content"] = _choice(
                "inpainting_fill", body.get("inpainting_fill", 1), INPAINTING_FILL
            )
            values["only_masked"] = _flag("inpaint_full_res", body.get("inpaint_full_res", False))
            values["invert_mask"] = _flag("inpainting_mask_invert", body.get("inpainting_mask_invert", 0))
            values.setdefault("strength", 0.75)  # A1111's default, also for inpainting
    elif "init_images" in body and body["init_images"]:
        raise InvalidRequestError("init_images belongs to img2img; txt2img takes none")
    elif body.get("enable_hr") and body.get("denoising_strength") is not None:
        values["hr_denoising_strength"] = body["denoising_strength"]  # txt2img: the hires pass's
    control = _controlnet(body.get("alwayson_scripts"), engine)
    if control:
        if task == "inpaint":
            raise InvalidRequestError("the segmentation ControlNet cannot be combined with a mask here")
        values.update(control)
        task = "seg2img"
    request = fields.new_request(task, values)
    request = check_request(request, engine)
    from webui.plot import enabled, make_plan, source_names

    if enabled(request):  # every cell checked now: a bad axis is a 422, not a failed job
        make_plan(request, fields, limits=engine.limits, names=source_names(engine))
    save = (
        _flag("save_images", body.get("save_images", False))
        and bool(overrides.get("samples_save", True))
        and not _flag("do_not_save_samples", body.get("do_not_save_samples", False))
    )
    echo = {key: value for key, value in body.items() if key not in ("init_images", "mask")}
    echo.update({"init_images": None, "mask": None} if route == "img2img" else {})
    return Parsed(
        request=request,
        save=save,
        send_images=_flag("send_images", body.get("send_images", True)),
        init_images=[item for item in init_images if isinstance(item, str)],
        include_init_images=_flag("include_init_images", body.get("include_init_images", False)),
        echo=echo,
        grids_only=grids_only,
    )


# A1111's X/Y/Z plot axis types, in the order of its script's dropdown (``script_args`` gives their
# index; A1111 1.10's list), mapped to this server's axis names; an axis it lacks is refused
_A1111_AXES = {
    "txt2img": (
        "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
        "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name",
        "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise",
        "Schedule type", "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Eta", "Clip skip",
        "Denoising", "Initial noise multiplier", "Extra noise", "Hires upscaler", "VAE", "Styles",
    ),
    "img2img": (
        "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale",
        "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name", "Negative Guidance minimum sigma",
        "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type", "Schedule min sigma",
        "Schedule max sigma", "Schedule rho", "Eta", "Clip skip", "Denoising", "Initial noise multiplier",
        "Extra noise", "Cond. Image Mask Weight", "VAE", "Styles",
    ),
}  # fmt: skip
_A1111_AXIS_NAMES = {
    "Checkpoint name": "Checkpoint",
    "Denoising": "Denoising strength",
    "Hires upscaler": "Upscaler",
}
_PLOT_SCRIPT = "x/y/z plot"


def _script(name: Any, args: Any, route: str) -> tuple[dict[str, Any], bool]:
    """A1111's ``script_name`` + ``script_args``: the X/Y/Z plot's fields, and whether the answer
    holds the grids alone. ``script_args`` is the script's ``run`` arguments in order: X type,
    X values, X values (dropdown), the same for Y and Z, draw legend, include sub images, include
    sub grids, keep -1 for seeds, then margin size, text-input mode and raw lines (ignored)."""
    if name in (None, ""):
        if args not in (None, [], ()):
            raise InvalidRequestError("script_args needs a script_name")
        return {}, False
    if not isinstance(name, str) or name.strip().lower() != _PLOT_SCRIPT:
        raise InvalidRequestError(
            f"script_name: {str(name)[:60]!r} is not supported; the one script is {_PLOT_SCRIPT!r}"
        )
    if not isinstance(args, (list, tuple)) or len(args) < 9:
        raise InvalidRequestError(
            "script_args for the x/y/z plot: a list of at least 9 values (X type, X values, X values "
            "dropdown, then Y and Z alike, draw legend, include sub images, include sub grids, keep -1 for seeds)"
        )
    labels = _A1111_AXES["img2img" if route == "img2img" else "txt2img"]
    values: dict[str, Any] = {"xyz_enabled": True}
    for number, axis in enumerate(("x", "y", "z")):
        kind, text, picked = args[3 * number : 3 * number + 3]
        if isinstance(kind, bool) or not isinstance(kind, (int, str)):
            raise InvalidRequestError(f"script_args: the {axis.upper()} type must be an index or a name")
        if isinstance(kind, int):
            if not 0 <= kind < len(labels):
                raise InvalidRequestError(
                    f"script_args: {axis.upper()} type {kind} is not one of A1111's axes"
                )
            kind = _A1111_AXIS_NAMES.get(labels[kind], labels[kind])
        if isinstance(picked, list) and picked:  # a choice axis's dropdown: the names picked
            text = ",".join(_csv_item(str(item)) for item in picked)
        if text is not None and not isinstance(text, str):
            text = str(text)
        values[f"xyz_{axis}_type"], values[f"xyz_{axis}_values"] = kind, text or ""
    names = ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds")
    given = list(args[9:13])
    legend, lone, _sub_grids, keep = (
        _flag(label, given[k]) if k < len(given) else default
        for k, (label, default) in enumerate(zip(names, (True, False, False, False), strict=True))
    )
    values["xyz_draw_legend"], values["xyz_keep_seeds"] = legend, keep
    return values, not lone


def _csv_item(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def check_request(request: Any, engine: Any) -> Any:
    """Everything about ``request`` that can be checked before it waits in the queue: the fields,
    the task's inputs, the limits, the sampler and the model names (404 when not installed)."""
    fields = engine.fields
    request = fields.validate(request.validate(tasks=fields))
    engine.limits.check_request(request)
    from webui.errors import UnknownSamplerError

    try:
        engine.schedulers.get(request.sampler)
    except UnknownSamplerError:
        raise ApiProblem(404, f"sampler {request.sampler[:60]!r} not found; see /sdapi/v1/samplers") from None
    from webui.engine.vae import is_automatic

    for name, kind, route in (
        (request.model, "checkpoint", "sd-models"),
        (request.vae, "vae", "sd-vae"),
        (request.controlnet, "controlnet", "../controlnet/model_list"),
    ):
        if not name or (kind == "vae" and is_automatic(name)):
            continue
        try:
            engine.models.source_of(name, kind)
        except ModelNotFoundError:
            raise ApiProblem(
                404,
                f"{'model' if kind == 'checkpoint' else kind} {name[:80]!r} not found; "
                f"see /sdapi/v1/{route}".replace("/sdapi/v1/../", "/"),
            ) from None
    return request


def _unknown_key(key: str, route: str, plugin_names: list[str]) -> str:
    import difflib

    known = [*_DIRECT, *_HANDLED, *plugin_names]
    close = difflib.get_close_matches(key[:100], known, n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown field {key[:100]!r} for {route}{hint}"


def _apply_settings(values: dict[str, Any], settings: Mapping[str, Any]) -> None:
    model = settings.get("sd_model_checkpoint")
    if model is not None:
        if not isinstance(model, str):
            raise InvalidRequestError("sd_model_checkpoint must be a model name")
        values["model"] = split_hash(model) or None
    vae = settings.get("sd_vae")
    if vae is not None:
        if not isinstance(vae, str):
            raise InvalidRequestError("sd_vae must be a VAE name, Automatic or None")
        values["vae"] = None if vae.strip().lower() in ("", "automatic", "none") else split_hash(vae)
    clip = settings.get("CLIP_stop_at_last_layers")
    if clip is not None:
        values["clip_skip"] = clip


def _sampler(body: Mapping[str, Any], engine: Any) -> str:
    """``sampler_name`` (or the older ``sampler_index``) joined with A1111 1.9's ``scheduler``."""
    from webui.fields import DEFAULT_SAMPLER

    name = body.get("sampler_name") or body.get("sampler_index") or DEFAULT_SAMPLER
    schedule = body.get("scheduler")
    if not isinstance(name, str) or (schedule is not None and not isinstance(schedule, str)):
        raise InvalidRequestError("sampler_name and scheduler must be text")
    name = name.strip()
    schedule = (schedule or "").strip().replace("_", " ")  # the API's "sgm_uniform" is "SGM Uniform"
    if (
        schedule
        and schedule.lower() not in ("automatic", "uniform")
        and not name.lower().endswith(" " + schedule.lower())
    ):
        name = f"{name} {schedule}"
    return name


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        return False
    raise InvalidRequestError(f"{name} must be true or false, got {str(value)[:40]!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str) and value in choices:
        return value
    raise InvalidRequestError(
        f"{name} must be 0 to {len(choices) - 1} ({', '.join(choices)}), got {str(value)[:40]!r}"
    )


def _controlnet(scripts: Any, engine: Any) -> dict[str, Any]:
    """The ControlNet extension's units as seg2img values (one enabled unit, module ``none``)."""
    if scripts is None or scripts == {}:
        return {}
    if not isinstance(scripts, dict):
        raise InvalidRequestError("alwayson_scripts must be a JSON object")
    unknown = [name for name in scripts if str(name).lower() != "controlnet"]
    if unknown:
        raise InvalidRequestError(
            f"alwayson_scripts: {str(unknown[0])[:60]!r} is not supported; only controlnet is"
        )
    script = next(iter(scripts.values()))
    units = script.get("args") if isinstance(script, dict) else None
    if not isinstance(units, list):
        raise InvalidRequestError("alwayson_scripts.controlnet.args must be a list of units")
    enabled = [unit for unit in units if isinstance(unit, dict) and unit.get("enabled", True) is not False]
    if any(not isinstance(unit, dict) for unit in units):
        raise InvalidRequestError("each ControlNet unit must be a JSON object")
    if not enabled:
        return {}
    if len(enabled) > 1:
        raise InvalidRequestError("only one ControlNet unit can be used per request")
    unit = enabled[0]
    allowed = {
        "enabled",
        "image",
        "input_image",
        "model",
        "module",
        "weight",
        "guidance_start",
        "guidance_end",
        "mask",
        *_CONTROLNET_INERT,
    }
    extra = [key for key in unit if key not in allowed]
    if extra:
        raise InvalidRequestError(f"ControlNet unit: {str(extra[0])[:60]!r} is not supported")
    module = unit.get("module", "none")
    if not isinstance(module, str) or module.strip().lower() not in ("none", ""):
        raise InvalidRequestError(
            f"ControlNet module {str(module)[:40]!r} is not supported: send a ready "
            'segmentation map with module "none"'
        )
    if unit.get("mask"):
        raise InvalidRequestError("ControlNet unit: a mask is not supported")
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # the extension also takes {"image": b64, "mask": b64}
        image = image.get("image")
    if image is None:
        raise InvalidRequestError("ControlNet unit: image is missing (a base64 segmentation map)")
    values: dict[str, Any] = {"seg_map": decode_image(image, "ControlNet image")}
    model = unit.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("ControlNet unit: model must be a ControlNet name")
    if model and model.strip().lower() not in ("none", ""):
        values["controlnet"] = split_hash(model.strip())
    for key, name in (
        ("weight", "control_scale"),
        ("guidance_start", "control_start"),
        ("guidance_end", "control_end"),
    ):
        if key in unit:
            values[name] = unit[key]
    return values


# -- answers ---------------------------------------------------------------------------------


def info_of(request: Any, finished: Any) -> dict[str, Any]:
    """A1111's ``info`` for a finished request: seeds, infotexts and the values it ran with."""
    from webui.metadata import parse_infotext

    infotexts = list(finished.infotexts)
    parsed = parse_infotext(infotexts[0]) if infotexts else {}
    seeds = list(finished.seeds)
    count = len(seeds)

    def number(key: str, default: Any) -> Any:
        text = parsed.get(key)
        try:
            value = float(text) if text is not None else None
        except ValueError:
            return default
        if value is None or not math.isfinite(value):
            return default
        return int(value) if value.is_integer() else value

    sampler = parsed.get("Sampler", request.sampler)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": number("Size-1", request.width),
        "height": number("Size-2", request.height),
        "sampler_name": sampler,
        "scheduler": parsed.get("Schedule type", "Automatic"),
        "cfg_scale": number("CFG scale", request.cfg_scale),
        "steps": number("Steps", request.steps),
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": parsed.get("Model"),
        "sd_model_hash": parsed.get("Model hash"),
        "sd_vae_name": parsed.get("VAE"),
        "sd_vae_hash": parsed.get("VAE hash"),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": number("Denoising strength", None),
        "extra_generation_params": {key: value for key, value in parsed.items() if key not in _INFO_KEYS},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(request.extra.get("styles") or ()),
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": number("Clip skip", request.clip_skip),
        "is_using_inpainting_conditioning": False,
        "version": _version(),
    }


_INFO_KEYS = frozenset(
    {
        "Prompt",
        "Negative prompt",
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Size-1",
        "Size-2",
        "Model",
        "Model hash",
        "VAE",
        "VAE hash",
        "Clip skip",
        "Denoising strength",
    }
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"latent-studio {version('latent-studio')}"
    except Exception:  # not installed as a package (a checkout)
        return "latent-studio"


def images_of(finished: Any) -> list[str]:
    """The finished request's images as base64 PNGs (saved files as on disk; unsaved ones with
    their infotext)."""
    return [
        encode_png(image, text) for (image, _), text in zip(finished.files, finished.infotexts, strict=False)
    ]


def answer(parsed: Parsed, finished: Any) -> dict[str, Any]:
    """A1111's answer to txt2img/img2img: ``images``, ``parameters`` and ``info`` (a JSON string).
    An X/Y/Z plot answers its grids first, then (with "include sub images") every cell's image."""
    images = images_of(finished) if parsed.send_images else []
    if parsed.grids_only:
        images = [
            image for image, (_, caption) in zip(images, finished.files, strict=False) if caption == "grid"
        ]
    if parsed.include_init_images and parsed.send_images:
        images += [_bare_base64(item) for item in parsed.init_images]
    return {
        "images": images,
        "parameters": parsed.echo,
        "info": json.dumps(info_of(parsed.request, finished)),
    }


def _bare_base64(text: str) -> str:
    text = text.strip()
    return text.partition(",")[2] if text.startswith("data:") else text
