"""Built-in textual-inversion embeddings: the ``models/embeddings`` files, usable in every prompt.

In ``patch_model`` the request gets its :class:`~webui.api.EmbeddingLibrary` (the embeddings the
model folders list, read on first use) in ``context.state[EMBEDDINGS_STATE]``, where the text encoding
finds it: no weight changes, the vectors are written into the token-embedding layer's output only
while a prompt is encoded (see :mod:`webui.engine.embeddings`). After the text is encoded, the
embeddings the prompts used go into the image's ``parameters`` as A1111's ``TI hashes``.
"""

from __future__ import annotations

from webui.api import (
    EMBEDDINGS_STATE,
    Conditioning,
    EmbeddingLibrary,
    GenerationRequest,
    ModelPatches,
    RunContext,
    hookimpl,
)

LATENT_STUDIO_API = 1


@hookimpl
def patch_model(request: GenerationRequest, context: RunContext, patches: ModelPatches) -> None:
    library = EmbeddingLibrary.from_models(context.engine.models)
    patches.add(
        "embeddings",
        lambda: context.state.__setitem__(EMBEDDINGS_STATE, library),
        lambda: context.state.pop(EMBEDDINGS_STATE, None),
    )


@hookimpl(trylast=True)
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    library = context.state.get(EMBEDDINGS_STATE)
    if isinstance(library, EmbeddingLibrary):
        for key, value in library.metadata().items():
            conditioning.metadata.setdefault(key, value)
