"""Built-in init-image conditioning (img2img): the image to start from and the denoising strength."""

from __future__ import annotations

from PIL import Image

from webui.api import Conditioning, GenerationRequest, RunContext, hookimpl, image_to_tensor

LATENT_STUDIO_API = 1


@hookimpl
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    if request.init_image is None:
        return
    image = request.init_image
    if image.size != (context.width, context.height):
        image = image.resize((context.width, context.height), Image.Resampling.LANCZOS)
    conditioning.init_image = image_to_tensor(image)
    conditioning.strength = float(request.strength)
    conditioning.metadata["Denoising strength"] = request.strength
