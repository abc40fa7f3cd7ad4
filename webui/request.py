"""The typed, validated, per-request description of one generation.

A :class:`GenerationRequest` carries everything a generation needs, including the model choice:
nothing about a request lives in global state, so two users of one server never see each other's
settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from webui.errors import InvalidRequestError
from webui.fields import BUILTIN_TASKS, builtin_field, check_text
from webui.images import normalize_image, normalize_mask

Task = Literal["txt2img", "img2img", "inpaint", "seg2img"]
TASKS: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_TASKS)  # plugins may register more
MaskedContent = Literal["original", "fill", "latent noise", "latent nothing"]


@dataclass
class GenerationRequest:
    """One generation: the model, the task, the prompts, the images and the sampling parameters.

    Sizes: ``width`` and ``height`` must be multiples of 8 (the VAE's downscale factor); other
    values are refused with the nearest valid sizes in the message rather than silently changed (a
    ``prepare_request`` plugin may round them instead). ``None`` means the model's native size.

    Seeds: ``seed=-1`` picks a random seed. Image ``k`` of the request uses ``seed + k``, so any
    image of a batch can be reproduced alone, as in AUTOMATIC1111.
    """

    task: str = "txt2img"  # a built-in Task or one a plugin registered
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    sampler: str = "DPM++ 2M Karras"
    steps: int = 20
    cfg_scale: float | None = None  # None: the model's recommended guidance (7 unless it says)
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    eta: float = 0.0
    # img2img (also the image to inpaint)
    init_image: Image.Image | None = None
    strength: float = 0.75
    # inpainting
    mask: Image.Image | None = None
    mask_blur: int = 4
    invert_mask: bool = False
    masked_content: MaskedContent = "original"
    only_masked: bool = False
    only_masked_padding: int = 32
    keep_unmasked: bool = True
    # segmentation map -> ControlNet
    seg_map: Image.Image | None = None
    controlnet: str | None = None
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    # a separate VAE by name (None or "Automatic": the model's own)
    vae: str | None = None
    # the values of plugins' fields (register_fields), checked and completed with their defaults by
    # the engine's field registry; other keys are free-form values for plugins
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """A field's value by name: a built-in field's attribute, else ``extra[name]``."""
        if name in _ATTRIBUTES:
            return getattr(self, name)
        return self.extra.get(name, default)

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def validate(self, *, sizes: bool = True, tasks: Any = None) -> GenerationRequest:
        """Check every field; return a normalised copy (RGB images, binary-ready L masks).

        Raises :class:`InvalidRequestError` with a one-line message naming the field. The ranges
        are the built-in field declarations' (``webui.fields.BUILTIN_FIELDS``). ``sizes=False``
        skips the multiple-of-8 check (the engine checks sizes only after the ``prepare_request``
        plugins, which may round them). ``tasks`` is a :class:`~webui.fields.FieldRegistry` whose
        tasks are accepted (default: the built-in ones); a task's required inputs must be there.
        """
        registry = tasks if tasks is not None else _builtin_registry()
        spec = registry.task(self.task)
        for name in _CHECKED:
            value = getattr(self, name)
            if name == "seed":
                if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < 2**32:
                    raise InvalidRequestError(
                        f"seed must be -1 (random) or an integer in [0, 2**32), got {value!r}"
                    )
                continue
            if name in ("width", "height") and value is not None:
                builtin_field(name).check(value)
                if sizes and value % 8:
                    low, high = value - value % 8, value - value % 8 + 8
                    raise InvalidRequestError(f"{name} {value} is not a multiple of 8; use {low} or {high}")
                continue
            builtin_field(name).check(value)
        if self.control_start > self.control_end:
            raise InvalidRequestError("control_start must not be after control_end")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidRequestError("prompt and negative_prompt must be text")
        check_text("prompt", self.prompt)
        check_text("negative prompt", self.negative_prompt)
        if self.vae is not None and not isinstance(self.vae, str):
            raise InvalidRequestError(f"vae must be a VAE name, got {self.vae!r}")

        init = normalize_image(self.init_image, "init_image") if self.init_image is not None else None
        seg = normalize_image(self.seg_map, "seg_map") if self.seg_map is not None else None
        mask = None
        if self.mask is not None:
            if init is None:
                raise InvalidRequestError("a mask needs an image to inpaint (init_image)")
            mask = normalize_mask(self.mask, init.size)
        present = {"init_image": init, "mask": mask, "seg_map": seg}
        spec.check(
            {
                **self.extra,
                **{name: getattr(self, name) for name in spec.inputs if hasattr(self, name)},
                **present,
            }
        )
        return self.replace(init_image=init, mask=mask, seg_map=seg, extra=dict(self.extra))


def request_attributes() -> frozenset[str]:
    """The names of :class:`GenerationRequest`'s own fields (the rest of the registry's fields
    live in ``extra``)."""
    return _ATTRIBUTES


def _builtin_registry() -> Any:
    global _BUILTIN_REGISTRY
    if _BUILTIN_REGISTRY is None:
        from webui.fields import FieldRegistry

        _BUILTIN_REGISTRY = FieldRegistry.builtin()
    return _BUILTIN_REGISTRY


_BUILTIN_REGISTRY: Any = None
_ATTRIBUTES = frozenset(item.name for item in dataclasses.fields(GenerationRequest))
# checked here in this order (text and images are checked apart below)
_CHECKED = (
    "steps",
    "batch_size",
    "batch_count",
    "clip_skip",
    "mask_blur",
    "only_masked_padding",
    "seed",
    "width",
    "height",
    "cfg_scale",
    "strength",
    "eta",
    "control_scale",
    "control_start",
    "control_end",
    "masked_content",
    "invert_mask",
    "keep_unmasked",
    "only_masked",
)
