"""Generations under load: one process against one and two Ray Serve replicas.

    python benchmarks/bench_ray_load.py [--clients 4] [--requests 24] [--steps 20] [--setups process,1,2]

``--clients`` threads send ``--requests`` txt2img requests in all (the shipped default model at its
native size, batch 1, a different seed each), each client sending its next request when the last one
came back. The same load runs against each setup in turn:

- ``process``: a plain engine in this process with ``--threads`` torch threads; generations take
  turns as in the web app (one at a time per device), so clients queue for the turn;
- ``1``, ``2`` (any number): a local Ray started here and a deployment of that many replicas, the
  cores split between them (torch threads and Ray CPUs alike), used through ``RayEngine`` with as
  many turns as replicas, as the web app does with ``--ray --replicas N``.

Each setup is warmed up first (the engine loads the model; with Ray, as many requests at once as
there are replicas, so that every replica loads it) and the warm-up is not in the timings. A Ray
deployment is deleted before the next one starts. Latency is per request, from submit to result,
waiting for a turn included. Ray is imported by the Ray setups only (``--setups process`` runs
without it; the others need ``pip install -r requirements-ray.txt``). Not part of the test suite:
timings depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training import shapes  # noqa: E402
from webui.engine import torch_thread  # noqa: E402
from webui.engine.pipeline import Engine  # noqa: E402
from webui.request import GenerationRequest  # noqa: E402

PROMPT = shapes.Scene("circle", "red", "large", "center", "white").caption()
NAMES = {"process": "one process", "1": "one replica", "2": "two replicas"}


@dataclass
class Outcome:
    """One setup's timed run."""

    setup: str
    warm_up: float  # seconds: model load (and deployment) plus the warm-up requests
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)


Generate = Callable[[GenerationRequest], tuple[Any, str]]  # a request -> (its result, who made it)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (``q`` from 0 to 1)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def requests(count: int, steps: int, sampler: str, first_seed: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt=PROMPT, steps=steps, sampler=sampler, seed=first_seed + i)
        for i in range(count)
    ]


def at_once(generate: Generate, batch: list[GenerationRequest]) -> list[str]:
    """Send every request of ``batch`` at the same time; who made each result."""
    made: list[str] = []
    errors: list[BaseException] = []

    def one(request: GenerationRequest) -> None:
        try:
            made.append(generate(request)[1])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(request,)) for request in batch]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return made


def load(generate: Generate, work: list[GenerationRequest], clients: int, outcome: Outcome) -> None:
    """``clients`` threads send the requests of ``work``, each one after its last came back."""
    queue = list(reversed(work))
    taking = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        while not errors:
            with taking:
                if not queue:
                    return
                request = queue.pop()
            started = time.perf_counter()
            try:
                result, replica = generate(request)
            except BaseException as error:
                errors.append(error)
                return
            outcome.latencies.append(time.perf_counter() - started)
            outcome.replicas.append(replica)
            if len(result.images) != 1:
                errors.append(RuntimeError(f"seed {request.seed}: {len(result.images)} images, not 1"))
            outcome.sizes.update(item.image.size for item in result.images)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcome.wall = time.perf_counter() - started
    if errors:
        raise errors[0]


class Turns:
    """``count`` turns handed out first come, first served, as the web app's queue does (a bare
    semaphore lets one client overtake the others again and again, which skews p95)."""

    def __init__(self, count: int) -> None:
        self.free = count
        self.next_ticket = 0
        self.serving = 0
        self.changed = threading.Condition()

    def __enter__(self) -> None:
        with self.changed:
            ticket = self.next_ticket
            self.next_ticket += 1
            self.changed.wait_for(lambda: ticket == self.serving and self.free > 0)
            self.serving += 1
            self.free -= 1
            self.changed.notify_all()

    def __exit__(self, *exc: object) -> None:
        with self.changed:
            self.free += 1
            self.changed.notify_all()


def run_process(args: argparse.Namespace, work: list[GenerationRequest]) -> Outcome:
    from webui.engine.stream import stream

    torch.set_num_threads(args.threads)
    turn = Turns(1)  # the web app's device turn (StudioService.device_turn)
    started = time.perf_counter()
    engine = Engine(models_dir=str(ROOT / "models"))
    torch_thread.call(engine.models.get, None)  # where the web app loads it (webui.engine.torch_thread)

    def generate(request: GenerationRequest) -> tuple[Any, str]:
        # as the web app runs it: on a worker thread of its own (webui.engine.stream), so the
        # clients' threads never run torch (each would keep its own set of spinning OpenMP threads)
        with turn:
            result = None
            for event in stream(engine, request, preview_every=0):
                result = event
            return result, "this process"

    at_once(generate, requests(1, args.steps, args.sampler, 10_000))
    outcome = Outcome(NAMES["process"], warm_up=time.perf_counter() - started)
    load(generate, work, args.clients, outcome)
    return outcome  # the engine and its model go with this frame


def run_replicas(args: argparse.Namespace, replicas: int, work: list[GenerationRequest]) -> Outcome:
    from ray import serve

    from webui.serve.client import RayEngine
    from webui.serve.options import APP
    from webui.serve.replica import ReplicaSettings, deployment

    share = max(1, args.cores // replicas)
    settings = ReplicaSettings(models_dir=str(ROOT / "models"), threads=share, preview_every=0)
    local = Engine(models_dir=str(ROOT / "models"))  # never loads a model: the replicas do
    turns = Turns(replicas)  # the web app's turns with --replicas N
    own = threading.local()  # an engine per client thread: its last_replica is that thread's

    def generate(request: GenerationRequest) -> tuple[Any, str]:
        if not hasattr(own, "engine"):
            own.engine = RayEngine(local, handle, concurrency=replicas)
        with turns:
            result = own.engine.generate(request)
            return result, str(own.engine.last_replica)

    started = time.perf_counter()
    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": share, "num_gpus": 0}}
    handle = serve.run(deployment(settings, options), name=APP, route_prefix=None)
    try:
        seen = at_once(generate, requests(replicas, args.steps, args.sampler, 10_000))
        outcome = Outcome(NAMES.get(str(replicas), f"{replicas} replicas"), time.perf_counter() - started)
        if len(set(seen)) < replicas:
            note(f"  warm-up reached {len(set(seen))} of {replicas} replicas: the timed run includes a load")
        load(generate, work, args.clients, outcome)
    finally:
        serve.delete(APP)  # its replicas stop before the next setup's start
    return outcome


def parse_setups(text: str) -> list[str]:
    setups = [part.strip() for part in text.split(",") if part.strip()]
    for setup in setups:
        if setup != "process" and not (setup.isdigit() and int(setup) >= 1):
            raise SystemExit(f"--setups: {setup!r} is neither 'process' nor a number of replicas")
    if not setups:
        raise SystemExit("--setups: name at least one setup")
    return setups


def replica_column(ids: list[str]) -> str:
    distinct = sorted(set(ids))
    return f"{len(distinct)}: {', '.join(distinct)}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--requests", type=int, default=24, help="requests in all, per setup")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the one-process engine (default: all cores)",
    )
    parser.add_argument(
        "--setups", default="process,1,2", help="comma-separated: 'process' and numbers of replicas"
    )
    args = parser.parse_args()
    setups = parse_setups(args.setups)
    if args.clients < 1 or args.requests < 1 or args.steps < 1:
        raise SystemExit("--clients, --requests and --steps must be at least 1")
    args.cores = os.cpu_count() or 1
    args.threads = args.threads or args.cores
    ray_setups = [int(setup) for setup in setups if setup != "process"]
    if ray_setups and importlib.util.find_spec("ray") is None:
        raise SystemExit(
            "the Ray setups need Ray Serve (pip install -r requirements-ray.txt); "
            "--setups process runs without it"
        )

    work = requests(args.requests, args.steps, args.sampler, 1)
    outcomes: list[Outcome] = []
    threads: list[str] = []
    ray_version = ""
    try:
        for setup in setups:
            if setup == "process":
                note(f"{NAMES['process']}: {args.threads} torch threads")
                outcomes.append(run_process(args, work))
                gc.collect()
                threads.append(f"one process: {args.threads} torch threads")
                continue
            import ray

            if not ray.is_initialized():
                from webui.serve.options import runtime_env

                ray.init(
                    num_cpus=args.cores,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env=runtime_env(),
                )
                ray_version = f", ray {ray.__version__}"
            replicas = int(setup)
            share = max(1, args.cores // replicas)
            note(f"{NAMES.get(setup, setup + ' replicas')}: {replicas} x {share} torch threads")
            outcomes.append(run_replicas(args, replicas, work))
            threads.append(f"{outcomes[-1].setup}: {replicas} × {share} torch threads (num_cpus {share})")
    finally:
        if ray_setups and "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()

    sizes = sorted({size for outcome in outcomes for size in outcome.sizes})
    print(
        f"# {platform.processor() or platform.machine()}, {args.cores} cores, "
        f"torch {torch.__version__}{ray_version}"
    )
    print(
        f"{args.clients} clients, {args.requests} requests per setup: txt2img, {args.steps} steps, "
        f"{args.sampler}, {' '.join(f'{w}x{h}' for w, h in sizes)}, batch 1"
    )
    print(
        "| setup | requests | wall s | images/s | p50 latency s | p95 latency s | warm-up s | replicas seen |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        count = len(outcome.latencies)
        print(
            f"| {outcome.setup} | {count} | {outcome.wall:.2f} | {count / outcome.wall:.2f} "
            f"| {percentile(outcome.latencies, 0.5):.2f} | {percentile(outcome.latencies, 0.95):.2f} "
            f"| {outcome.warm_up:.2f} | {replica_column(outcome.replicas)} |"
        )
    print(f"\nthreads: {'; '.join(threads)}")
    print(
        "latency: from submit to result, the wait for a turn included; warm-up: loading the model "
        "(with Ray: starting the deployment too) and the warm-up requests, not in the other columns"
    )


if __name__ == "__main__":
    main()
