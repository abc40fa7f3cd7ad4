"""The ``--ray`` flags (Ray is not imported here) and turning them into a running deployment."""

from __future__ import annotations

import argparse
import os
from typing import Any

from webui.errors import InvalidRequestError

RAY_REQUIREMENT = "ray[serve]>=2.60,<2.61"
APP = "latent-studio"  # the Ray Serve application


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Serve (several replicas, machines and GPUs)")
    group.add_argument("--ray", action="store_true", help="run generations on a Ray Serve deployment")
    group.add_argument(
        "--ray-address",
        default=None,
        help="a running Ray cluster (default: start a local Ray on this machine)",
    )
    scaling = group.add_mutually_exclusive_group()
    scaling.add_argument(
        "--replicas", type=int, default=None, help="a fixed number of engine replicas (default 1)"
    )
    scaling.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="replicas from MIN to MAX, following the ongoing requests (one per replica is the target)",
    )
    group.add_argument(
        "--replica-cache",
        type=int,
        default=2,
        help="models a replica keeps loaded (least recently used go first)",
    )


def autoscale_range(text: str | None) -> tuple[int, int] | None:
    """``"1:4"`` -> (1, 4); a one-line error for anything else."""
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or len(text) > 12:
        raise InvalidRequestError(f"--autoscale takes MIN:MAX (e.g. 1:4), got {text!r}")
    low_n, high_n = int(low), int(high)
    if high_n < 1 or low_n > high_n:
        raise InvalidRequestError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low_n, high_n


def ray_problem(args: argparse.Namespace) -> str | None:
    """Why the Ray flags cannot be used, before anything starts (None when they can)."""
    if not getattr(args, "ray", False):
        given = [
            flag
            for flag, value in (
                ("--ray-address", args.ray_address),
                ("--replicas", args.replicas),
                ("--autoscale", args.autoscale),
            )
            if value is not None
        ]
        return f"{', '.join(given)} need --ray" if given else None
    if args.replicas is not None and args.replicas < 1:
        return f"--replicas must be at least 1, got {args.replicas}"
    if args.replica_cache < 1:
        return f"--replica-cache must be at least 1, got {args.replica_cache}"
    try:
        autoscale_range(args.autoscale)
    except InvalidRequestError as error:
        return str(error)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return f"--ray needs Ray Serve: pip install -r requirements-ray.txt ('{RAY_REQUIREMENT}')"
    return None


def runtime_env() -> dict[str, Any]:
    """Replicas import this very ``webui`` (its folder first on their path): on a cluster, every node
    needs Latent Studio installed at the same version (docs: deploy/)."""
    from pathlib import Path

    import webui

    root = str(Path(webui.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}


def connect(args: argparse.Namespace, local: Any) -> Any:
    """Start (or join) Ray, deploy the engine replicas, and return the :class:`RayEngine` the
    front ends use in place of ``local``."""
    import ray
    from ray import serve

    from webui.serve.client import RayEngine
    from webui.serve.replica import ReplicaSettings, deployment

    problem = ray_problem(args)
    if problem:
        raise InvalidRequestError(problem)
    if not ray.is_initialized():
        ray.init(
            address=args.ray_address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env()
        )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = args.replicas or 1
    cpus = max(1, (os.cpu_count() or 2) // replicas) if not gpus else 1
    settings = ReplicaSettings(
        models_dir=str(args.models_dir),
        extra_models_dirs=[str(path) for path in args.extra_models_dir or []],
        default_model=args.model,
        cache_size=args.replica_cache,
        threads=cpus,
        allow_pickle=getattr(args, "allow_pickle", False),
    )
    app = deployment(
        settings,
        replicas=replicas,
        autoscale=autoscale_range(args.autoscale),
        num_gpus=1 if gpus else 0,
        num_cpus=cpus,
    )
    if APP in serve.status().applications:  # replaced, not updated in place: a rolling update
        serve.delete(APP)  # would need room for the old and the new replicas at once
    handle = serve.run(app, name=APP, route_prefix=None)
    scale = autoscale_range(args.autoscale)
    return RayEngine(local, handle, concurrency=scale[1] if scale else replicas)
