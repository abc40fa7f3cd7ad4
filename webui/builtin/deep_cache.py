"""Built-in DeepCache (Ma, Fang and Wang 2024, "DeepCache: Accelerating Diffusion Models for Free"):
an opt-in approximation that reuses the UNet's deep features from one step to the next.

The deep features of a UNet change slowly between adjacent denoising steps, while its shallow
layers carry the detail. With an interval ``N`` the whole UNet runs on every ``N``-th step (the
first step of each pass included) and the input of its top up block (the output of the up block
below it, which sums up every deeper layer) is kept. On the steps between, only the shallow branch
runs: the time embedding, ``conv_in``, the top down block, then the top up block on the kept
features with the fresh skip connections, and the output layers. Everything below the top level
(the lower down blocks, the middle block, the lower up blocks) is skipped.

What it works with: classifier-free guidance (the batch is ``[unconditional; conditional]`` on
every step, and each half keeps its own features), 9-channel inpainting UNets (the extra
channels enter through ``conv_in``), SDXL-style UNets (the added text and time embeddings enter
through the time embedding), LCM-style guidance embeddings, and ControlNets: on a shallow step the
ControlNet residuals of the top level's skip connections are added as in a full step (the deeper
ones only act through the kept features; the ControlNet itself still runs on every step, so the
gain is smaller with one). A UNet call with inputs the shallow branch does not handle (attention
masks, cross-attention arguments, T2I-adapter residuals) runs in full, and the infotext says so
(``DeepCache note``). A UNet without the usual structure is refused with a message.

The interval is the request field ``deep_cache_interval`` (1, the default, is off), declared with
``register_fields``: its control, command-line flag, infotext entry (``DeepCache interval: N``) and
PNG Info's reading come from that declaration. The UNet's ``forward`` is replaced, and a hook added,
for the request only (``patch_model``); both are removed when it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from webui.api import (
    DenoiseStep,
    GenerationRequest,
    InvalidRequestError,
    ModelPatches,
    OutputImage,
    RunContext,
    hookimpl,
)

LATENT_STUDIO_API = 1
FIELD = "deep_cache_interval"  # the request field (request.extra["deep_cache_interval"])
INFOTEXT = "DeepCache interval"
NOTE = "DeepCache note"  # infotext entry when some cached steps had to run in full
GROUP = "Approximations"  # the accordion of the opt-in approximations (with token merging)
STATE = "deep_cache"  # RunContext.state key: the request's DeepCache
MAXIMUM = 10
# UNet inputs the shallow branch does not reproduce: a call with any of them runs in full
UNSUPPORTED_INPUTS = (
    "attention_mask",
    "encoder_attention_mask",
    "cross_attention_kwargs",
    "down_intrablock_additional_residuals",
)
UNET_PARTS = (
    "get_time_embed",
    "get_class_embed",
    "get_aug_embed",
    "process_encoder_hidden_states",
    "time_embedding",
    "conv_in",
    "conv_out",
    "down_blocks",
    "up_blocks",
)


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    register(
        FIELD,
        "int",
        default=1,
        minimum=1,
        maximum=MAXIMUM,
        step=1,
        label="DeepCache interval",
        group=GROUP,
        help="run the whole UNet every N steps and only its top level in between, reusing the "
        "deeper features: faster, slightly different images (1 = off, 2 or 3 is typical)",
        infotext=INFOTEXT,
    )


def cache_interval(request: GenerationRequest) -> int:
    """The request's DeepCache interval (1 when it is off)."""
    return int(request.extra.get(FIELD) or 1)


def unsupported(unet: Any) -> str | None:
    """Why ``unet`` cannot run DeepCache's shallow branch, or None when it can."""
    name = type(unet).__name__
    missing = [part for part in UNET_PARTS if not hasattr(unet, part)]
    if missing:
        return f"the model's UNet ({name}) is not a diffusers UNet2DConditionModel-style UNet"
    down_blocks, up_blocks = list(unet.down_blocks), list(unet.up_blocks)
    if len(down_blocks) < 2 or len(up_blocks) < 2:
        return f"the model's UNet ({name}) has a single resolution level: there is nothing deeper to cache"
    if getattr(unet.config, "addition_embed_type", None) == "image_hint":
        return f"the model's UNet ({name}) takes an image hint, which the shallow branch does not"
    if not all(hasattr(block, "resnets") for block in (*down_blocks, *up_blocks)):
        return f"the model's UNet ({name}) has blocks of an unknown kind"
    # the top up block's skip connections must be conv_in's output and the top down block's
    skips = 1 + sum(_outputs(block) for block in down_blocks)
    if skips != sum(len(block.resnets) for block in up_blocks):
        return f"the model's UNet ({name}) has skip connections of an unusual layout"
    if len(up_blocks[-1].resnets) > 1 + _outputs(down_blocks[0]):
        return f"the model's UNet ({name}) feeds its top up block from deeper levels"
    return None


def _outputs(block: Any) -> int:
    """How many skip connections a down block gives (one per resnet, one per downsampler)."""
    return len(block.resnets) + len(getattr(block, "downsamplers", None) or [])


class DeepCache:
    """DeepCache on ``unet`` for one request: :meth:`attach` replaces its ``forward`` and hooks the
    up block below the top to keep its output; :meth:`detach` puts everything back.

    :meth:`start_step` (called by the ``wrap_denoiser`` wrapper before each denoiser call) says
    whether the coming UNet call is a full one (every ``interval``-th step) or a shallow one."""

    def __init__(self, unet: Any, interval: int) -> None:
        self.unet, self.interval = unet, interval
        self.shallow = False  # the coming call may use the kept features
        self.features: torch.Tensor | None = None  # the top up block's input, from the last full call
        self.full_calls = 0
        self.shallow_calls = 0
        self.fallbacks: dict[str, int] = {}  # why a shallow step ran in full -> how often
        self._handle: Any = None
        self._saved: tuple[bool, Any] = (False, None)

    # -- patching -------------------------------------------------------------------------------

    def attach(self) -> None:
        unet = self.unet
        self._saved = ("forward" in unet.__dict__, unet.__dict__.get("forward"))
        self._original = unet.forward  # the class's forward (or one already put on the instance)
        self._handle = unet.up_blocks[-2].register_forward_hook(self._keep)
        unet.forward = self._forward

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        had_own, own = self._saved
        if had_own:
            self.unet.forward = own
        elif "forward" in self.unet.__dict__:
            del self.unet.forward
        self.features = None

    def start_step(self, index: int) -> None:
        self.shallow = index % self.interval != 0

    def end_step(self) -> None:
        self.shallow = False

    # -- the UNet call --------------------------------------------------------------------------

    def _keep(self, _module: Any, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.features = output

    def _forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if self.shallow:
            reason = "positional arguments" if args else self._cannot_reuse(sample, kwargs)
            if reason is None:
                self.shallow_calls += 1
                return self._shallow(sample, timestep, encoder_hidden_states, **kwargs)
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self.full_calls += 1
        return self._original(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def _cannot_reuse(self, sample: torch.Tensor, kwargs: dict[str, Any]) -> str | None:
        features = self.features
        if features is None:
            return "no features kept yet"
        if features.shape[0] != sample.shape[0] or features.shape[-2:] != sample.shape[-2:]:
            return "the batch or size changed since the last full step"
        given = [name for name in UNSUPPORTED_INPUTS if kwargs.get(name) is not None]
        if given:
            return f"UNet input {given[0]}"
        if (kwargs.get("down_block_additional_residuals") is None) != (
            kwargs.get("mid_block_additional_residual") is None
        ):
            return "adapter residuals"
        return None

    def _shallow(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Any = None,
        mid_block_additional_residual: Any = None,
        return_dict: bool = True,
        **_unused: Any,
    ) -> Any:
        """The top level of the UNet's forward (diffusers' ``UNet2DConditionModel.forward``, steps
        for the time embedding, ``conv_in``, the top down and up blocks and the output layers),
        with the kept features in place of everything deeper."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = (
                torch.cat([emb, class_emb], dim=-1)
                if unet.config.class_embeddings_concat
                else emb + class_emb
            )
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        sample = unet.conv_in(sample)
        top_down = unet.down_blocks[0]
        if getattr(top_down, "has_cross_attention", False):
            _, res_samples = top_down(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states
            )
        else:
            _, res_samples = top_down(hidden_states=sample, temb=emb)
        skips = (sample, *res_samples)
        if down_block_additional_residuals is not None:  # a ControlNet's, for the top level's skips
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=False))
        top_up = unet.up_blocks[-1]
        skips = skips[: len(top_up.resnets)]
        assert self.features is not None
        if getattr(top_up, "has_cross_attention", False):
            sample = top_up(
                hidden_states=self.features,
                temb=emb,
                res_hidden_states_tuple=skips,
                encoder_hidden_states=encoder_hidden_states,
            )
        else:
            sample = top_up(hidden_states=self.features, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        sample = unet.conv_out(sample)
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)


# -- hooks --------------------------------------------------------------------------------------


@hookimpl
def patch_model(request: GenerationRequest, context: RunContext, patches: ModelPatches) -> None:
    interval = cache_interval(request)
    if interval <= 1:
        return
    unet = context.bundle.unet
    problem = unsupported(unet)
    if problem is not None:
        raise InvalidRequestError(
            f"{FIELD}: {problem}; set it to 1 (off) for the model {context.bundle.name!r}"
        )
    cache = DeepCache(unet, interval)
    context.state[STATE] = cache
    patches.add("DeepCache", cache.attach, cache.detach)


@hookimpl
def wrap_denoiser(request: GenerationRequest, context: RunContext) -> Any:
    cache = context.state.get(STATE)
    if cache is None:
        return None

    def wrap(call: Callable[[torch.Tensor, DenoiseStep], torch.Tensor]) -> Any:
        def cached(model_input: torch.Tensor, step: DenoiseStep) -> torch.Tensor:
            cache.start_step(step.index)
            try:
                return call(model_input, step)
            finally:
                cache.end_step()

        return cached

    return wrap


@hookimpl
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    cache = context.state.get(STATE)
    if cache is None or not cache.fallbacks:
        return
    count = sum(cache.fallbacks.values())
    reasons = ", ".join(sorted(cache.fallbacks))
    parameters[NOTE] = f"{count} cached steps ran in full ({reasons})"
