"""The loaded model: every component the one denoising loop needs, in one typed object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from webui.engine.model_defaults import DEFAULT_CFG_SCALE, model_default_cfg, native_size, vae_scale_factor

__all__ = ["DEFAULT_CFG_SCALE", "Family", "ModelBundle", "model_default_cfg"]

Family = str  # "sd1", "sd2", "sdxl", or a project's own (e.g. "latent-studio")


@dataclass
class ModelBundle:
    """The components of a latent-diffusion model.

    ``text_encoders`` and ``tokenizers`` are parallel lists: one pair for SD 1.x/2.x, two for SDXL
    (the second one a ``CLIPTextModelWithProjection`` that also gives the pooled embedding).
    ``controlnets`` maps a name (``"seg"`` for the segmentation ControlNet) to a ``ControlNetModel``.
    ``scheduler_config`` is the model's own scheduler configuration; the sampler chosen per request
    is built from it, so no scheduler state is ever shared between requests.
    """

    name: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    family: Family = "sd1"
    controlnets: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    model_hash: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # the model's own latent scaling when ``vae`` is a swapped-in VAE (see webui.engine.vae)
    latent_scaling: dict[str, Any] | None = None
    # where the models compute while their weights are offloaded to CPU memory (webui.engine.memory)
    execution_device: torch.device | None = None
    # the model's prompt reader (webui.engine.reader), when its folder ships one; it runs on the CPU
    reader: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config.block_out_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def is_inpainting_unet(self) -> bool:
        """True for UNets that take the mask and masked-image latents concatenated to the input."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def is_sdxl(self) -> bool:
        """SDXL-style conditioning (pooled text embedding and size time ids): the base model's two
        text encoders, or the refiner's one."""
        config = getattr(self.unet, "config", None)  # text-only bundles (training) have no UNet
        return getattr(config, "addition_embed_type", None) == "text_time"

    @property
    def time_id_count(self) -> int:
        """How many time ids an SDXL-style UNet takes: 6 (sizes and crop) for the base model, 5
        (sizes, crop and an aesthetic score) for the refiner; 0 for other models."""
        if not self.is_sdxl:
            return 0
        config = self.unet.config
        pooled = int(getattr(self.text_encoders[-1].config, "projection_dim", 0) or 0)
        total = int(config.projection_class_embeddings_input_dim)
        return (total - pooled) // int(config.addition_time_embed_dim)

    @property
    def default_size(self) -> int:
        """The native output side in pixels (512 for SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL...),
        by the rules the web UI reads a model folder with (:func:`webui.engine.model_defaults.native_size`)."""
        return native_size(
            self.config, sample_size=self.unet.config.sample_size, scale_factor=self.vae_scale_factor
        )

    @property
    def default_cfg_scale(self) -> float:
        """The guidance a request gets when it names none: the model's ``defaults.cfg_scale`` in
        ``model_index.json``, else 7 (what SD 1.x/2.x/SDXL are usually run with)."""
        return model_default_cfg(self.config)

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders, *self.controlnets.values()]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self
