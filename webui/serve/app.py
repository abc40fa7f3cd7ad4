"""The Serve application for a cluster that runs it on its own (a KubeRay RayService, or
``serve run webui.serve.app:app``): the deployment of :mod:`webui.serve.replica`, configured by
environment variables (a Serve config's ``runtime_env``), since a Serve config's import path
cannot take arguments. The web app then joins it with ``launch.py --ray --ray-deployed``.

* ``LATENT_STUDIO_MODELS_DIR``: the models folder the replicas load from (the same path the web
  app lists models from; default: the data folder's ``models/``);
* ``LATENT_STUDIO_MODEL``: the model of requests that name none (default: the folder's default);
* ``LATENT_STUDIO_REPLICA_CACHE``: models a replica keeps loaded (default 2).

The number of replicas, their GPUs and autoscaling are the deployment's settings in the Serve
config (deployment ``latent-studio-engine``; see deploy/README.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from webui.errors import InvalidRequestError
from webui.serve.replica import ReplicaSettings, deployment

__all__ = ["app", "settings_from_env"]


def settings_from_env(environ: Mapping[str, str] = os.environ) -> ReplicaSettings:
    """The replicas' settings from the ``LATENT_STUDIO_*`` variables above (one-line errors)."""
    from webui import paths

    cache_text = environ.get("LATENT_STUDIO_REPLICA_CACHE", "2").strip()
    if not cache_text.isdigit() or not 1 <= int(cache_text) <= 64:
        raise InvalidRequestError(
            f"LATENT_STUDIO_REPLICA_CACHE must be a whole number from 1 to 64, got {cache_text[:20]!r}"
        )
    return ReplicaSettings(
        models_dir=environ.get("LATENT_STUDIO_MODELS_DIR", "").strip() or str(paths.models_dir()),
        default_model=environ.get("LATENT_STUDIO_MODEL", "").strip() or None,
        cache_size=int(cache_text),
        threads=None,  # as Ray sets it for the replica's CPUs
    )


app = deployment(settings_from_env())
