"""Generation on Ray Serve replicas (``webui.serve``): a local Ray started by the test, two CPU
replicas of a tiny model, one torch thread each. Skipped where Ray Serve is not installed (it is an
optional dependency: requirements-ray.txt)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install -r requirements-ray.txt")

from webui.engine.pipeline import Engine  # noqa: E402
from webui.request import GenerationRequest  # noqa: E402
from webui.serve.client import RayEngine  # noqa: E402
from webui.serve.replica import ReplicaSettings, deployment  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    import shutil

    import ray

    from webui.serve.options import runtime_env

    models = tmp_path_factory.mktemp("models")
    for name in ("tiny-a", "tiny-b"):  # two models of the same weights, routed apart by name
        shutil.copytree(tiny_model_dir, models / name)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    settings = ReplicaSettings(models_dir=str(models), default_model="tiny-a", threads=1, preview_every=0)
    handle = serve.run(deployment(settings, replicas=2, num_cpus=1), name="latent-studio", route_prefix=None)
    local = Engine(models_dir=str(models), default_model="tiny-a")
    yield RayEngine(local, handle), local
    serve.shutdown()
    ray.shutdown()


def request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle", steps=4, seed=seed, width=64, height=64, sampler="Euler")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(item.image, dtype=np.int16) for item in result.images])


def test_a_replica_gives_the_pixels_of_one_process(cluster):
    remote, local = cluster
    saved = []
    result = remote.generate(request(5), on_batch=saved.extend)
    assert np.array_equal(pixels(result), pixels(local.generate(request(5))))
    assert result.infotexts == local.generate(request(5)).infotexts
    assert [item.seed for item in saved] == [5]  # the batch came back to be saved here


def test_two_requests_at_once_run_on_two_replicas(cluster):
    remote, _ = cluster
    replicas, times = [], []

    def one(seed: int) -> None:
        engine = RayEngine(remote.local, remote.handle)
        started = time.perf_counter()
        engine.generate(request(seed))
        times.append(time.perf_counter() - started)
        replicas.append(engine.last_replica)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    wall = time.perf_counter() - started
    assert len(set(replicas)) == 2, replicas
    assert wall < sum(times), (wall, times)


def test_interrupt_stops_the_replica_and_keeps_the_finished_batches(cluster):
    from webui.engine.control import GenerationControl

    remote, _ = cluster
    control = GenerationControl()
    steps = []
    events = remote.stream(request(9).replace(steps=30, batch_count=3), control=control, preview_every=0)
    result = None
    for event in events:
        if hasattr(event, "step"):
            steps.append((event.batch, event.step))
            if event.batch == 2 and event.step == 2:
                control.interrupt()
        else:
            result = event
    assert result is not None and result.interrupted
    assert [item.seed for item in result.images] == [9]  # the first batch, finished before the interrupt
    assert max(steps) < (2, 30)
    # the replica is free again: the next request runs
    assert remote.generate(request(3)).images[0].image.size == (64, 64)


def test_a_second_request_for_a_model_goes_to_the_replica_that_has_it(cluster):
    remote, _ = cluster
    first = RayEngine(remote.local, remote.handle)
    first.generate(request(1).replace(model="tiny-b"))  # only this replica has tiny-b now
    for seed in (2, 3, 4):
        again = RayEngine(remote.local, remote.handle)
        again.generate(request(seed).replace(model="tiny-b"))
        assert again.last_replica == first.last_replica


def test_the_command_line_generates_over_ray_as_in_one_process(cluster, tmp_path, capsys):
    from PIL import Image

    from webui.cli import main

    _, local = cluster
    common = ["--models-dir", str(local.models.models_dir)]
    run = [
        "generate",
        "--model",
        "tiny-a",
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--seed",
        "5",
        "--sampler",
        "Euler",
    ]

    def image(*flags: str, out: str) -> np.ndarray:
        assert main([*flags, *common, *run, "--out", str(tmp_path / out)]) == 0
        path = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
        assert Path(path).parent.parent.parent == tmp_path / out  # saved here, by the caller
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    over_ray, alone = image("--ray", "--replicas", "1", out="ray"), image(out="local")
    # the replica runs torch on its share of the cores (2 threads here, 1 in this process): float
    # sums in another order move a few pixels by a level or two; the fixture's one-thread replicas
    # give identical pixels (test_a_replica_gives_the_pixels_of_one_process)
    difference = np.abs(over_ray - alone)
    assert difference.max() <= 3 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_the_web_app_generates_over_ray_and_saves_here(cluster, tmp_path):
    import datetime

    from PIL import Image
    from ui_server import Server, call

    from webui.metadata import read_png_parameters

    server = Server(tmp_path / "outputs", "--ray", "--replicas", "1")
    try:
        client = server.client()
        progress, _, gallery, infotext = call(
            client, "txt2img", Prompt="a red circle", Steps=4, **{"Seed (-1 = random)": 5}
        )[:4]
        assert progress.startswith("1 image(s) in") and len(gallery) == 1
        day = server.outputs / "txt2img" / datetime.date.today().strftime("%Y-%m-%d")
        files = sorted(day.glob("*-5.png"))
        assert files and read_png_parameters(files[-1]) == infotext  # saved by the web app, here
        alone = server.engine.local.generate(
            server.engine.local.fields.new_request(
                "txt2img", {"prompt": "a red circle", "steps": 4, "seed": 5}
            )
        )
        difference = np.abs(
            np.asarray(Image.open(files[-1]).convert("RGB"), dtype=np.int16) - pixels(alone)[0]
        )
        assert difference.max() <= 3 and difference.mean() < 0.05  # see the command-line test
    finally:
        server.close()


def test_two_clicks_at_once_run_on_two_replicas(cluster, tmp_path):
    from ui_server import Server, submit

    server = Server(tmp_path / "outputs", "--ray", "--replicas", "2")
    try:
        assert server.engine.concurrency == 2
        client = server.client()

        def run(*seeds: int) -> float:
            started = time.perf_counter()
            jobs = [
                submit(client, "txt2img", Prompt="a red circle", Steps=30, **{"Seed (-1 = random)": seed})
                for seed in seeds
            ]
            for job in jobs:
                assert job.result(timeout=300)[0].startswith("1 image(s) in")
            return time.perf_counter() - started

        run(1, 2)  # each replica loads the model on its first request
        both, one = run(3, 4), run(5)
        assert both < 1.8 * one, (both, one)  # side by side, not one after the other
    finally:
        server.close()
