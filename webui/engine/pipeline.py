"""The one denoising loop under every task.

A task is only a set of conditionings: text alone is txt2img; an init image adds img2img; a mask
adds inpainting; a segmentation map adds a ControlNet. Any combination runs through
:meth:`Engine.generate` without a pipeline class of its own.

For the same components, seed, sampler and steps the images equal those of diffusers' reference
pipelines (the parity tests prove it), so real checkpoints behave here as they do elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from webui.engine import codec, cpu_kernels
from webui.engine.bundle import ModelBundle
from webui.engine.compiled import CompiledUNets, Route
from webui.engine.context import (
    Conditioning,
    DenoiserCall,
    DenoiseStep,
    GenerationControl,
    GenerationStopped,
    GuidanceCombine,
    ModelPatches,
    OutputImage,
    RunContext,
    StepInfo,
)
from webui.engine.memory import (
    MemoryPlan,
    MemorySettings,
    applied,
    choose_plan,
    is_out_of_memory,
    lower_plan,
    release_memory,
    trim_heap,
)
from webui.engine.models import ModelManager
from webui.engine.schedulers import SchedulerRegistry
from webui.engine.upscalers import UpscalerRegistry
from webui.engine.vae import is_automatic
from webui.errors import InvalidRequestError, OutOfMemoryError, PluginError
from webui.fields import FieldRegistry
from webui.images import tensor_to_images
from webui.limits import Limits
from webui.metadata import format_infotext
from webui.plugins import PluginManager, make_plugin_manager
from webui.request import GenerationRequest

StepCallback = Callable[[StepInfo], None]
BatchCallback = Callable[[list[OutputImage]], None]
MEMORY_STATE = "memory"  # RunContext.state key: the memory plan's note for the image metadata
UNET_STATE = "unet call"  # RunContext.state key: the compiled UNet one batch runs, when the plan compiles
NO_PROMPT_EMBEDS = "no conditioning plugin provided prompt embeddings"
log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """The images of one request, with their seeds and ``parameters`` texts (A1111 infotext)."""

    images: list[OutputImage] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def pil_images(self) -> list[Any]:
        return [item.image for item in self.images]

    @property
    def infotexts(self) -> list[str]:
        return [item.parameters.get("infotext", "") for item in self.images]

    @property
    def seeds(self) -> list[int]:
        return [item.seed for item in self.images]


class Engine:
    """Loads models on demand and runs generation requests.

    One engine serves many users: it holds the plugins, the sampler registry and the model cache,
    and nothing request-specific. ``device``/``dtype`` are where models are put.
    """

    def __init__(
        self,
        *,
        plugins: PluginManager | None = None,
        models_dir: str | None = None,
        default_model: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        cache_size: int = 2,
        allow_download: bool = True,
        extra_models_dirs: Sequence[str | Path] = (),
        allow_paths: bool = True,
        allow_pickle: bool = False,
        memory: MemorySettings | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.limits = (limits or Limits()).validated()  # what one request may ask for
        self.plugins = plugins if plugins is not None else make_plugin_manager()
        self.device = torch.device(device)
        # "auto": fp16 on GPUs; on the CPU bf16 for big models where the CPU has native bf16, else fp32
        auto = dtype == "auto"
        if isinstance(dtype, str) and not auto:
            raise InvalidRequestError(f"dtype {dtype!r}: pass a torch.dtype or 'auto'")
        base = (torch.float16 if self.device.type in ("cuda", "mps") else torch.float32) if auto else dtype
        self.dtype: torch.dtype = base  # type: ignore[assignment]
        self.memory = memory or MemorySettings()
        self.compiled = CompiledUNets()  # --compile: the UNets compiled so far, used while unpatched
        self.schedulers = SchedulerRegistry()
        self.plugins.hook.register_schedulers(register=self._register_scheduler)
        self.upscalers = UpscalerRegistry(self)  # image upscalers (register_upscalers), listed on demand
        self.fields = FieldRegistry.from_plugins(self.plugins)  # every request field and task, declared once
        self.models = ModelManager(
            self.plugins,
            models_dir=models_dir,
            device=self.device,
            dtype=self.dtype,
            auto_dtype=auto,
            default_model=default_model,
            cache_size=cache_size,
            allow_download=allow_download,
            extra_models_dirs=extra_models_dirs,  # more models roots (an A1111 or ComfyUI models folder)
            allow_paths=allow_paths,  # False: request model names may not be paths (web server)
            allow_pickle=allow_pickle,  # True: pickle checkpoints are read, weights only (--allow-pickle)
        )
        self.plugins.hook.startup(engine=self)

    def _register_scheduler(self, name: str, factory: Any, **kwargs: Any) -> None:
        self.schedulers.register(name, factory, **kwargs)

    # -- public API -------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        bundle: ModelBundle | None = None,
        callback: StepCallback | None = None,
        control: GenerationControl | None = None,
        on_batch: BatchCallback | None = None,
    ) -> GenerationResult:
        """Run ``request`` and return its images (each with seed and infotext).

        ``bundle`` overrides the request's model (useful when a model was built in code);
        ``callback`` is called after each step; ``control`` interrupts or skips from another
        thread; ``on_batch`` gets each batch's finished images as soon as they are decoded and
        described (before the next batch starts), so a caller can save them even if a later
        batch fails. Raises :class:`~webui.errors.LatentStudioError` subclasses for bad input.
        """
        started = time.perf_counter()
        request = self.fields.validate(request.validate(sizes=False, tasks=self.fields))
        self.limits.check_request(request)  # before a model is loaded
        # an unknown name fails here, before a model is loaded; a known one is written as registered
        request = request.replace(sampler=self.schedulers.get(request.sampler).name)
        bundle = bundle or self.models.get(request.model)
        if request.vae is not None and not is_automatic(request.vae):
            bundle = self._with_vae(bundle, request.vae)
        control = control or GenerationControl()
        seed = request.seed if request.seed >= 0 else random.randrange(2**32 - 1 - 10_000)
        request = request.replace(seed=seed)
        if request.cfg_scale is None:
            request = request.replace(cfg_scale=bundle.default_cfg_scale)

        context = self._context(request, bundle, control)
        self.plugins.hook.prepare_request(request=request, context=context)
        request = self.fields.validate(request.validate(tasks=self.fields))
        context.request = request
        context.width, context.height = self._size(request, bundle)
        self.limits.check_request(request, context.width, context.height)  # again: plugins may change it
        peak_width, peak_height = context.peak_size or (context.width, context.height)
        if context.peak_size is not None:  # a later pass (hires fix) works at this size
            self.limits.check_request(request, peak_width, peak_height)

        # Model patches (the prompt's LoRAs, textual-inversion embeddings, plugins' own): collected
        # first, then applied to the cached bundle only inside this block, under the model's lock,
        # and undone in reverse order when it ends, also on an error or an interrupt.
        patches = ModelPatches()
        self.plugins.hook.patch_model(request=request, context=context, patches=patches)
        result = GenerationResult()
        per_batch = request.batch_size
        with self.models.lock(bundle), patches.applied():
            plan = choose_plan(
                self.memory, bundle, self.device, width=peak_width, height=peak_height, batch=per_batch
            )
            for batch in range(request.batch_count):
                if control.interrupted:
                    result.interrupted = True
                    break
                context.batch_index = batch
                context.seeds = [seed + batch * per_batch + k for k in range(per_batch)]
                try:
                    images, plan = self._run_batch_planned(request, context, callback, plan)
                except GenerationStopped:  # stopped between steps (e.g. while encoding a prompt)
                    images = []
                finally:
                    control.clear_skip()
                result.images.extend(images)
                if on_batch is not None and images:
                    on_batch(images)
        result.interrupted = result.interrupted or control.interrupted
        result.seconds = time.perf_counter() - started
        return result

    # -- internals --------------------------------------------------------------------------

    def _run_batch_planned(
        self, request: GenerationRequest, context: RunContext, callback: StepCallback | None, plan: MemoryPlan
    ) -> tuple[list[OutputImage], MemoryPlan]:
        """One batch under ``plan`` (at most ``plan.max_batch`` images at a time). When it runs out
        of memory: release memory, step one rung down (:func:`~webui.engine.memory.lower_plan`) and
        run the whole batch again, up to the last rung. Returns the images and the plan that
        worked, which the following batches of the request keep."""
        seeds = list(context.seeds)
        retried = False
        while True:
            if plan != MemoryPlan(attention=plan.attention) or retried:
                note = plan.describe() + (" (retried after running out of memory)" if retried else "")
                context.state[MEMORY_STATE] = note
            try:
                images: list[OutputImage] = []
                with applied(context.bundle, plan, context.device), self._kernels(context, plan):
                    if plan.compile:
                        self._route_unet(context)
                    chunk = plan.max_batch or len(seeds)
                    for first in range(0, len(seeds), chunk):
                        context.seeds = seeds[first : first + chunk]
                        images.extend(self._run_batch(request, context, callback))
                        if context.control.interrupted or context.control.skipped:
                            break
                return images, plan
            except Exception as error:
                if not (self.memory.recover and is_out_of_memory(error)):
                    raise
                first_line = (str(error).strip().splitlines() or [""])[0][:160]
                failure = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
            finally:
                context.seeds = seeds
                context.state.pop(UNET_STATE, None)
            # outside the except block: the failed attempt's frames, and the tensors they held, are
            # unreachable now, so the memory can really be given back
            release_memory(context.device)
            lower = lower_plan(plan, len(seeds), context.device)
            if lower is None:
                raise OutOfMemoryError(
                    f"out of memory even with the lowest-memory plan ({plan.describe()}): {failure}. "
                    "Try a smaller size or batch size, or close other programs using the "
                    f"{'GPU' if context.device.type == 'cuda' else 'memory'}"
                )
            log.warning(
                "out of memory with plan %r (%s); retrying with %r",
                plan.describe(),
                failure,
                lower.describe(),
            )
            plan, retried = lower, True

    def _kernels(self, context: RunContext, plan: MemoryPlan) -> contextlib.AbstractContextManager[Any]:
        """The faster exact CPU kernels (:mod:`webui.engine.cpu_kernels`) for a model on the CPU
        big enough to gain from them, unless turned off or the UNet is compiled."""
        bundle = context.bundle
        if (
            not self.memory.cpu_kernels
            or plan.compile
            or context.device.type != "cpu"
            or not cpu_kernels.worth_it(bundle.unet)
        ):
            return contextlib.nullcontext()
        return cpu_kernels.applied([bundle.unet, *bundle.controlnets.values()])

    def _route_unet(self, context: RunContext) -> None:
        """The compiled UNet for this batch (compiling it on first use), or a note in the image
        metadata saying why the UNet runs uncompiled (patched for the request, compiling failed)."""
        route = self.compiled.route(context.bundle.unet)
        context.state[UNET_STATE] = route
        context.state[MEMORY_STATE] = route.describe(context.state.get(MEMORY_STATE) or "")

    def _with_vae(self, bundle: ModelBundle, name: str) -> ModelBundle:
        """A copy of ``bundle`` that decodes with the VAE ``name`` (the cached bundle is unchanged)."""
        vae = self.models.get_vae(name)
        if vae.config.latent_channels != bundle.latent_channels:
            raise InvalidRequestError(
                f"the VAE {name!r} has {vae.config.latent_channels} latent channels but the model "
                f"{bundle.name!r} needs {bundle.latent_channels}; choose a VAE made for this model"
            )
        config = dict(bundle.config)
        config["vae_name"], config["vae_hash"] = name, getattr(vae, "model_hash", None)
        return dataclasses.replace(bundle, vae=vae, config=config, latent_scaling=codec.model_scaling(bundle))

    def _context(
        self, request: GenerationRequest, bundle: ModelBundle, control: GenerationControl
    ) -> RunContext:
        return RunContext(
            bundle=bundle,
            request=request,
            width=0,
            height=0,
            device=bundle.device,
            dtype=bundle.dtype,
            control=control,
            engine=self,
        )

    @staticmethod
    def _size(request: GenerationRequest, bundle: ModelBundle) -> tuple[int, int]:
        factor = bundle.vae_scale_factor
        if request.width and request.height:
            width, height = request.width, request.height
        elif request.init_image is not None:  # the image's own size, rounded down to a multiple of 8
            step = max(8, factor)
            w, h = (max(side - side % step, step) for side in request.init_image.size)
            width, height = request.width or w, request.height or h
        else:
            width = request.width or bundle.default_size
            height = request.height or bundle.default_size
        if width % factor or height % factor or width < factor or height < factor:
            raise InvalidRequestError(f"size {width}x{height} must be a multiple of {factor} for this model")
        return width, height

    @torch.inference_mode()
    def _run_batch(
        self, request: GenerationRequest, context: RunContext, callback: StepCallback | None
    ) -> list[OutputImage]:
        bundle = context.bundle
        latents, cond = self._denoise(request, context, callback)
        if context.control.skipped and not context.control.interrupted:
            return []
        if not context.control.interrupted:
            latents = self._second_pass(request, context, callback, latents, cond)
            if context.control.skipped and not context.control.interrupted:
                return []

        # 5. Decode, post-process, describe (on the CPU, the loop's freed memory given back first,
        # so that it does not lie under the decode's)
        if context.device.type == "cpu":
            trim_heap()
        pixels = codec.decode_checked(self.decode_latents, bundle, latents, cond.metadata)
        outputs = [
            OutputImage(
                image=img,
                seed=s,
                index=s - request.seed,  # the image's place in the request
                pixels=(pixels[k] / 2 + 0.5).clamp(0, 1).cpu(),
            )
            for k, (img, s) in enumerate(zip(tensor_to_images(pixels), context.seeds, strict=True))
        ]
        self.plugins.hook.postprocess_images(images=outputs, request=request, context=context)
        for item in outputs:
            params: dict[str, Any] = {}
            self.plugins.hook.write_metadata(parameters=params, image=item, request=request, context=context)
            params.update({k: v for k, v in cond.metadata.items() if k not in params})
            item.parameters = {k: v for k, v in params.items() if v is not None}
            item.parameters["infotext"] = format_infotext(
                request.prompt,
                request.negative_prompt,
                {k: v for k, v in item.parameters.items() if k != "infotext"},
            )
        return outputs

    def _second_pass(
        self,
        request: GenerationRequest,
        context: RunContext,
        callback: StepCallback | None,
        latents: torch.Tensor,
        cond: Conditioning,
    ) -> torch.Tensor:
        """The latents of the ``second_pass`` a plugin asks for (the hires fix), or ``latents``
        unchanged when none does. The pass's conditioning notes join the first pass's metadata."""
        follow = self.plugins.hook.second_pass(request=request, context=context, latents=latents)
        if follow is None:
            return latents
        second = follow.request.validate(tasks=self.fields)
        width, height = self._size(second, context.bundle)
        self.limits.check_request(second, width, height)
        if tuple(follow.latents.shape[-2:]) != (
            height // context.bundle.vae_scale_factor,
            width // context.bundle.vae_scale_factor,
        ):
            raise PluginError(
                f"second pass: latents of {tuple(follow.latents.shape[-2:])} do not fit its size {width}x{height}"
            )
        if second.strength <= 0:  # nothing to denoise: the upscaled latents as they are
            return follow.latents.to(device=context.device, dtype=context.dtype)
        pass_context = dataclasses.replace(context, request=second, width=width, height=height)
        refined, second_cond = self._denoise(second, pass_context, callback, start=follow.latents)
        cond.metadata.update({k: v for k, v in second_cond.metadata.items() if k not in cond.metadata})
        return refined

    def _denoise(
        self,
        request: GenerationRequest,
        context: RunContext,
        callback: StepCallback | None,
        *,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Conditioning]:
        """Steps 1 to 4 of a batch: the conditioning, the timesteps, the initial latents (noise,
        the init image's latents, or ``start``: scaled latents a second pass begins from, noised to
        ``request.strength``) and the denoising loop. Returns the final latents and the conditioning."""
        bundle = context.bundle
        device, dtype = context.device, context.dtype
        batch = len(context.seeds)
        generators = context.generators()
        unet = bundle.unet

        # 1. Conditioning from every plugin (text, init image, mask, segmentation map, ...)
        cfg_scale = request.cfg_scale if request.cfg_scale is not None else bundle.default_cfg_scale
        cond = Conditioning(guidance_scale=float(cfg_scale))
        self.plugins.hook.provide_conditioning(request=request, context=context, conditioning=cond)
        if cond.prompt_embeds is None or cond.negative_prompt_embeds is None:
            raise PluginError(NO_PROMPT_EMBEDS)
        if start is not None:
            cond.strength = request.strength
        if context.state.get(MEMORY_STATE):
            cond.metadata.setdefault("Memory", context.state[MEMORY_STATE])
        do_cfg = cond.guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None

        # 2. Timesteps from a fresh scheduler (img2img and inpainting start part-way)
        scheduler = self.schedulers.build(request.sampler, bundle.scheduler_config, seed=context.seeds[0])
        scheduler.set_timesteps(request.steps, device=device)
        timesteps = scheduler.timesteps
        init_image = cond.init_image
        starts_from_image = init_image is not None or start is not None
        if starts_from_image:
            timesteps = _strength_timesteps(scheduler, request.steps, cond.strength)
            if len(timesteps) == 0:
                raise InvalidRequestError(
                    f"strength {cond.strength:g} with {request.steps} steps leaves no step to run; "
                    "raise the strength or the steps"
                )
        num_steps = len(timesteps) // getattr(scheduler, "order", 1)

        # 3. Initial latents: encode the init image, draw noise, encode the masked image
        height, width = context.height // bundle.vae_scale_factor, context.width // bundle.vae_scale_factor
        shape = (batch, bundle.latent_channels, height, width)
        inpainting = cond.mask is not None
        blend_mask = inpainting and not bundle.is_inpainting_unet
        pure_noise = not starts_from_image or (inpainting and cond.strength >= 1.0)
        image_latents = None
        if start is not None:
            image_latents = start.to(device=device, dtype=dtype)
        elif init_image is not None and (not pure_noise or blend_mask):
            image_latents = self.encode_images(bundle, init_image, generators)
            for transform in cond.init_latent_transforms:
                image_latents = transform(image_latents, context)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        if pure_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))

        mask, masked_image_latents = cond.mask, None
        if bundle.is_inpainting_unet:
            if mask is None:  # no mask: an inpainting UNet repaints everything (txt2img, img2img)
                mask = torch.ones(1, 1, context.height, context.width)
            masked = (
                cond.masked_image if cond.masked_image is not None else torch.zeros(1, 3, *mask.shape[-2:])
            )
            masked_image_latents = self.encode_images(bundle, masked, generators)
        mask_latents = None
        if mask is not None:
            mask_latents = torch.nn.functional.interpolate(mask, size=(height, width))
            mask_latents = mask_latents.to(device=device, dtype=dtype).repeat(batch, 1, 1, 1)
        blend: tuple[torch.Tensor, torch.Tensor] | None = None  # (image latents, mask latents)
        if blend_mask:
            if image_latents is None or mask_latents is None:
                raise PluginError("a mask was provided without an init image to keep outside it")
            blend = (image_latents, mask_latents)

        # 4. The denoising loop
        embeds, added_cond = _text_inputs(cond, batch, do_cfg, bundle)
        unet_extra = None
        if masked_image_latents is not None and mask_latents is not None:  # an inpainting UNet
            unet_extra = _doubled(torch.cat([mask_latents, masked_image_latents], dim=1), do_cfg)
        controls = [
            (c, _doubled(c.image.to(device, dtype).repeat(batch, 1, 1, 1), do_cfg)) for c in cond.controls
        ]
        step_kwargs = _step_kwargs(scheduler, generators, request.eta)
        # a distilled latent consistency UNet takes the guidance as an input instead of two passes
        guidance_input = _guidance_embedding(unet, cond.guidance_scale, batch, device, dtype)
        route: Route | None = context.state.get(UNET_STATE)  # the compiled UNet under --compile
        run_unet = route.call if route is not None else unet

        def unet_call(model_input: torch.Tensor, step: DenoiseStep) -> torch.Tensor:
            down_residuals, mid_residual = _control_residuals(
                controls,
                model_input,
                step.timestep,
                step.encoder_hidden_states,
                step.added_cond_kwargs,
                step.index,
                step.total,
            )
            unet_input = (
                torch.cat([model_input, unet_extra], dim=1) if unet_extra is not None else model_input
            )
            extra = {"timestep_cond": guidance_input} if guidance_input is not None else {}
            return run_unet(
                unet_input,
                step.timestep,
                **extra,
                encoder_hidden_states=step.encoder_hidden_states,
                added_cond_kwargs=step.added_cond_kwargs,
                down_block_additional_residuals=down_residuals,
                mid_block_additional_residual=mid_residual,
                return_dict=False,
            )[0]

        denoise: DenoiserCall = _wrapped(
            unet_call, self._wrappers("wrap_denoiser", request, context), "wrap_denoiser"
        )
        combine: GuidanceCombine = _wrapped(
            _guidance, self._wrappers("wrap_guidance", request, context), "wrap_guidance"
        )
        for i, t in enumerate(timesteps):
            if context.control.interrupted or context.control.skipped:
                break
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            step = DenoiseStep(
                context,
                i,
                len(timesteps),
                t,
                embeds,
                added_cond,
                do_cfg,
                cond.guidance_scale,
                *_sigma_of(scheduler),
            )
            noise_pred = denoise(model_input, step)
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = combine(uncond, text, cond.guidance_scale, step)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if blend is not None:
                known, repaint = blend
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(known, noise, torch.tensor([timesteps[i + 1]]))
                latents = (1 - repaint) * known + repaint * latents
            if (i + 1) % getattr(scheduler, "order", 1) == 0 or i == len(timesteps) - 1:
                info = StepInfo(
                    context, (i + 1) // getattr(scheduler, "order", 1) or 1, num_steps, t, latents
                )
                if callback is not None:
                    callback(info)
                self.plugins.hook.on_step(step=info)
        if route is not None and "Memory" in cond.metadata:  # compiling may have failed during the loop
            cond.metadata["Memory"] = route.describe(str(cond.metadata["Memory"]))
        return latents, cond

    def _wrappers(self, hook: str, request: GenerationRequest, context: RunContext) -> list[Any]:
        """The functions a ``wrap_*`` hook returned, in call order (guarded to name their plugin
        when the plugin manager can)."""
        call_wrappers = getattr(self.plugins, "call_wrappers", None)
        if call_wrappers is not None:
            return call_wrappers(hook, request=request, context=context)
        return list(getattr(self.plugins.hook, hook)(request=request, context=context))

    # -- VAE ---------------------------------------------------------------------------------

    @staticmethod
    def encode_images(
        bundle: ModelBundle, images: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Encode (1 or B, 3, H, W) images in [-1, 1] to scaled latents, sampling each image of
        the batch with its own generator (so image k depends on seed k only): :func:`codec.encode
        <webui.engine.codec.encode>`."""
        return codec.encode(bundle, images, generators)

    @staticmethod
    def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to float32 pixels in [-1, 1]: :func:`codec.decode <webui.engine.codec.decode>`."""
        return codec.decode(bundle, latents)


def _guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float, step: DenoiseStep) -> torch.Tensor:
    """Classifier-free guidance: the unconditional prediction moved ``scale`` times towards the
    conditional one (what diffusers' pipelines compute)."""
    return uncond + scale * (cond - uncond)


def _wrapped(inner: Callable[..., torch.Tensor], wrappers: Sequence[Any], hook: str) -> Any:
    """``inner`` wrapped by the functions a ``wrap_*`` hook returned, the first one (in pluggy's call
    order) outermost: ``wrappers[0](wrappers[1](inner))``."""
    call = inner
    for wrap in reversed(wrappers):
        if not callable(wrap):
            raise PluginError(f"{hook} must return a function or None, got {type(wrap).__name__}")
        call = wrap(call)
        if not callable(call):
            raise PluginError(f"a {hook} wrapper returned {type(call).__name__}, not a function")
    return call


def _sigma_of(scheduler: Any) -> tuple[Any, int | None]:
    """The scheduler's sigmas and the index of the coming step in them (``None, None`` for
    schedulers without sigmas). Before its first ``step`` a scheduler has no ``step_index`` yet:
    the step is then its ``begin_index`` (img2img) or 0."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        return None, None
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None) or 0
    return sigmas, int(index)


def _strength_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that img2img runs (diffusers' ``get_timesteps``)."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    order = getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return scheduler.timesteps[t_start * order :]


def _doubled(tensor: torch.Tensor, do_cfg: bool) -> torch.Tensor:
    return torch.cat([tensor] * 2) if do_cfg else tensor


def _text_inputs(
    cond: Conditioning, batch: int, do_cfg: bool, bundle: ModelBundle
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1))) if t.shape[0] != batch else t

    if cond.prompt_embeds is None or cond.negative_prompt_embeds is None:
        raise PluginError(NO_PROMPT_EMBEDS)
    embeds = per_image(cond.prompt_embeds)
    if do_cfg:
        embeds = torch.cat([per_image(cond.negative_prompt_embeds), embeds])
    if not bundle.is_sdxl:
        return embeds, None
    negative_pooled = cond.negative_pooled_prompt_embeds
    if cond.pooled_prompt_embeds is None or cond.add_time_ids is None or (do_cfg and negative_pooled is None):
        raise PluginError("an SDXL model needs pooled prompt embeddings and time ids from the text plugin")
    pooled, time_ids = per_image(cond.pooled_prompt_embeds), per_image(cond.add_time_ids)
    if do_cfg and negative_pooled is not None:
        pooled = torch.cat([per_image(negative_pooled), pooled])
        negative_ids = (
            cond.negative_add_time_ids if cond.negative_add_time_ids is not None else cond.add_time_ids
        )
        time_ids = torch.cat([per_image(negative_ids), time_ids])
    return embeds, {"text_embeds": pooled, "time_ids": time_ids}


def _guidance_embedding(
    unet: Any, scale: float, batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """The guidance input of a UNet distilled with its guidance scale as a condition (an LCM
    model's ``time_cond_proj_dim``), else None: ``w = scale - 1`` times 1000 in sinusoidal
    features of that many dimensions (sines then cosines, geometric frequencies from 1 down to
    1/10000), one row per image."""
    size = getattr(unet.config, "time_cond_proj_dim", None)
    if not size:
        return None
    w = torch.full((batch,), (scale - 1.0) * 1000.0, dtype=torch.float32)
    half = size // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if size % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features.to(device=device, dtype=dtype)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    return kwargs


def _control_residuals(
    controls: list[tuple[Any, torch.Tensor]],
    model_input: torch.Tensor,
    t: Any,
    embeds: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None,
    index: int,
    total: int,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for spec, image in controls:
        inactive = index / total < spec.start or (index + 1) / total > spec.end
        scale = spec.scale * (0.0 if inactive else 1.0)
        extra = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
        unet_dtype, kind = model_input.dtype, next(spec.model.parameters()).dtype
        inputs: tuple[torch.Tensor, ...] = (model_input, embeds, image)
        if kind != unet_dtype:  # a ControlNet loaded apart may have another dtype than the UNet
            inputs = tuple(x.to(kind) for x in inputs)
            extra = {k: {n: v.to(kind) for n, v in a.items()} for k, a in extra.items()}
        d, m = spec.model(
            inputs[0],
            t,
            encoder_hidden_states=inputs[1],
            controlnet_cond=inputs[2],
            conditioning_scale=scale,
            guess_mode=False,
            return_dict=False,
            **extra,
        )
        if kind != unet_dtype:
            d, m = [r.to(unet_dtype) for r in d], m.to(unet_dtype)
        if down is None:
            down, mid = list(d), m
        else:
            down = [a + b for a, b in zip(down, d, strict=True)]
            mid = mid + m
    return down, mid
