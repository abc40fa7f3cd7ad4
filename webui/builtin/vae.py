"""Built-in loader of separate VAEs: single files in the original layout, or diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from webui.api import LoadContext, hookimpl, load_vae, model_hash

LATENT_STUDIO_API = 1


@hookimpl(trylast=True)
def load_model(source: str, kind: str, context: LoadContext) -> Any:
    if kind != "vae":
        return None
    path = Path(source)
    if not path.exists():
        return None
    vae = load_vae(path, device=context.device, dtype=context.dtype, allow_pickle=context.allow_pickle)
    vae.model_hash = _hash(path)
    return vae


def _hash(path: Path) -> str | None:
    """A1111's short hash of a VAE file (None for folders)."""
    if not path.is_file():
        return None
    return model_hash(path)
