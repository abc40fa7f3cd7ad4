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
        "--ray-config",
        default=None,
        metavar="FILE",
        help="deployment settings in YAML, as in a Serve config's deployment entry: num_replicas, "
        "autoscaling_config, max_queued_requests, ray_actor_options, max_replicas_per_node "
        "(--replicas and --autoscale win over the file)",
    )
    group.add_argument(
        "--ray-deployed",
        action="store_true",
        help="use the latent-studio application already running on the cluster (a KubeRay "
        "RayService, see deploy/) instead of deploying one; --replicas or --autoscale's MAX then "
        "say how many generations to send at once",
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
                ("--ray-config", args.ray_config),
                ("--ray-deployed", args.ray_deployed or None),
            )
            if value is not None
        ]
        return f"{', '.join(given)} need --ray" if given else None
    if (args.ray_address or "").startswith("ray://"):
        return (
            "--ray-address: a ray:// (Ray Client) address cannot stream generations; run the web app "
            "on the cluster's head node with --ray-address auto (deploy/README.md)"
        )
    if args.replicas is not None and args.replicas < 1:
        return f"--replicas must be at least 1, got {args.replicas}"
    if args.ray_deployed and args.ray_config is not None:
        return "--ray-config sets up a deployment; with --ray-deployed the cluster's Serve config does"
    if args.replica_cache < 1:
        return f"--replica-cache must be at least 1, got {args.replica_cache}"
    try:
        autoscale_range(args.autoscale)
        if args.ray_config is not None:
            read_ray_config(args.ray_config)
    except InvalidRequestError as error:
        return str(error)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return f"--ray needs Ray Serve: pip install -r requirements-ray.txt ('{RAY_REQUIREMENT}')"
    return None


def runtime_env() -> dict[str, Any]:
    """Replicas import this very ``webui`` (its folder first on their path) and see this process's
    ``LATENT_STUDIO_*`` settings (data folder, plugin folders, safe mode, plugins chosen), so they
    load the same plugins: on a cluster, every node needs Latent Studio installed at the same
    version and the same folders (deploy/README.md)."""
    from pathlib import Path

    import webui

    root = str(Path(webui.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ours = {name: value for name, value in os.environ.items() if name.startswith("LATENT_STUDIO_")}
    return {"env_vars": {**ours, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}


# --ray-config: the keys of a Serve config's deployment entry that make sense here, with their checks
MAX_CONFIG_BYTES = 64 * 1024
_COUNT = ("a whole number of at least 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_CAPACITY = (
    "a whole number of at least 0",
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
)
_SECONDS = (
    "a number of at least 0",
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
)
_POSITIVE = ("a number above 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
_QUEUE = ("a whole number of at least 1, or -1 for no bound", lambda v: _COUNT[1](v) or v == -1)
AUTOSCALING_KEYS = {
    "min_replicas": _CAPACITY,
    "max_replicas": _COUNT,
    "initial_replicas": _CAPACITY,
    "target_ongoing_requests": _POSITIVE,
    "upscale_delay_s": _SECONDS,
    "downscale_delay_s": _SECONDS,
    "metrics_interval_s": _POSITIVE,
    "look_back_period_s": _POSITIVE,
    "upscaling_factor": _POSITIVE,
    "downscaling_factor": _POSITIVE,
}
ACTOR_KEYS = {"num_cpus": _SECONDS, "num_gpus": _SECONDS, "memory": _SECONDS}
DEPLOYMENT_KEYS = {
    "num_replicas": _COUNT,
    "max_queued_requests": _QUEUE,
    "max_replicas_per_node": _COUNT,
    "health_check_period_s": _POSITIVE,
    "health_check_timeout_s": _POSITIVE,
    "graceful_shutdown_timeout_s": _SECONDS,
}


def read_ray_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The deployment settings of a ``--ray-config`` file, checked (a one-line error otherwise).

    YAML (or JSON, which is YAML) holding one mapping with the keys of a Serve config's
    deployment entry that apply here: ``num_replicas``, ``autoscaling_config`` (``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``, delays...), ``max_queued_requests``,
    ``ray_actor_options`` (``num_cpus``, ``num_gpus``, ``memory``), ``max_replicas_per_node`` and
    the health-check and shutdown times. At most 64 KiB; any other key is refused by name.
    """
    import yaml

    where = f"--ray-config {os.fspath(path)}"
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise InvalidRequestError(f"{where}: cannot read it ({error.strerror or error})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidRequestError(f"{where}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise InvalidRequestError(f"{where}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{where}: must hold a mapping of deployment settings")
    config: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("autoscaling_config", "ray_actor_options"):
            known = AUTOSCALING_KEYS if key == "autoscaling_config" else ACTOR_KEYS
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{where}: {key} must be a mapping")
            config[key] = {
                inner: _checked(where, f"{key}.{inner}", known, inner, v) for inner, v in value.items()
            }
        else:
            config[str(key)] = _checked(where, str(key), DEPLOYMENT_KEYS, key, value)
    scaling = config.get("autoscaling_config")
    if scaling is not None:
        low, high = scaling.get("min_replicas", 1), scaling.get("max_replicas", 1)
        if low > high:
            raise InvalidRequestError(f"{where}: autoscaling_config.min_replicas is above max_replicas")
        if "num_replicas" in config:
            raise InvalidRequestError(f"{where}: give num_replicas or autoscaling_config, not both")
    return config


def _checked(where: str, name: str, known: dict[str, Any], key: Any, value: Any) -> Any:
    if key not in known:
        allowed = ", ".join(sorted(known))
        raise InvalidRequestError(f"{where}: unknown setting {str(name)[:60]!r} (known here: {allowed})")
    wanted, check = known[key]
    if not check(value):
        raise InvalidRequestError(f"{where}: {name} must be {wanted}")
    return value


def deployment_options(args: argparse.Namespace, *, gpus: int, cores: int) -> dict[str, Any]:
    """The Serve deployment's options: ``--ray-config``'s, then ``--replicas``/``--autoscale``
    over them; a replica takes one GPU when there are GPUs, else its share of the ``cores``."""
    options = read_ray_config(args.ray_config) if args.ray_config else {}
    scale = autoscale_range(args.autoscale)
    if args.replicas is not None or scale is not None:
        options.pop("num_replicas", None)
        options.pop("autoscaling_config", None)
    if args.replicas is not None:
        options["num_replicas"] = args.replicas
    elif scale is not None:
        low, high = scale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": 1,
        }
    elif "autoscaling_config" not in options:
        options.setdefault("num_replicas", 1)
    actor = dict(options.get("ray_actor_options", {}))
    actor.setdefault("num_gpus", 1 if gpus else 0)
    actor.setdefault("num_cpus", 1 if gpus else max(1, cores // most_replicas(options)))
    options["ray_actor_options"] = actor
    queue_size = getattr(args, "queue_size", None)
    if queue_size is not None:  # the ingress's bound holds in Ray's queue too (several ingresses)
        options.setdefault("max_queued_requests", queue_size)
    return options


def most_replicas(options: dict[str, Any]) -> int:
    """The most replicas a deployment with these options runs (so: generations at once)."""
    scaling = options.get("autoscaling_config")
    if scaling is not None:
        return max(1, int(scaling.get("max_replicas", 1)))
    return max(1, int(options.get("num_replicas", 1)))


def connect(args: argparse.Namespace, local: Any) -> Any:
    """Start (or join) Ray, deploy the engine replicas (or, with ``--ray-deployed``, find the
    running application), and return the :class:`RayEngine` the front ends use in place of
    ``local``."""
    import ray
    from ray import serve

    from webui.serve.client import RayEngine
    from webui.serve.replica import DEPLOYMENT, ReplicaSettings, deployment

    problem = ray_problem(args)
    if problem:
        raise InvalidRequestError(problem)
    if not ray.is_initialized():
        ray.init(
            address=args.ray_address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env()
        )
    if args.ray_deployed:
        status = serve.status().applications.get(APP)
        if status is None:
            raise InvalidRequestError(
                f"--ray-deployed: no {APP!r} application runs on this Ray cluster (deploy/README.md)"
            )
        # generations sent at once: --replicas or --autoscale's MAX (the application's own
        # settings are the cluster's), else the replicas running now
        scale = autoscale_range(args.autoscale)
        running = status.deployments.get(DEPLOYMENT)
        replicas = args.replicas or (scale[1] if scale else 0)
        if not replicas and running is not None:
            replicas = sum(running.replica_states.values())
        return RayEngine(local, serve.get_app_handle(APP), concurrency=max(1, replicas))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    options = deployment_options(args, gpus=gpus, cores=cores)
    settings = ReplicaSettings(
        models_dir=str(args.models_dir),
        extra_models_dirs=[str(path) for path in args.extra_models_dir or []],
        default_model=args.model,
        cache_size=args.replica_cache,
        threads=max(1, int(options["ray_actor_options"]["num_cpus"])),
        allow_pickle=getattr(args, "allow_pickle", False),
        allow_paths=local.models.allow_paths,
        allow_download=local.models.allow_download,
        device=getattr(args, "device", "auto"),
        dtype=getattr(args, "dtype", "auto"),
        memory=local.memory,
        limits=local.limits,
    )
    if APP in serve.status().applications:  # replaced, not updated in place: a rolling update
        serve.delete(APP)  # would need room for the old and the new replicas at once
    handle = serve.run(deployment(settings, options), name=APP, route_prefix=None)
    return RayEngine(local, handle, concurrency=most_replicas(options))
