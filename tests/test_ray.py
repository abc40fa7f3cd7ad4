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
    options = {
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 1},
        "health_check_period_s": 1,
    }
    handle = serve.run(deployment(settings, options), name="latent-studio", route_prefix=None)
    local = Engine(models_dir=str(models), default_model="tiny-a", allow_paths=False)
    yield RayEngine(local, handle, concurrency=2), local
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


def running_spans(engine: RayEngine) -> list[tuple[float, float]]:
    """Wrap ``engine.stream`` so each call records (its first step, its end) on a monotonic clock:
    two spans that overlap are two generations running at once (an order of events, so it holds
    however busy the machine is; a duration would not)."""
    spans: list[tuple[float, float]] = []
    original = engine.stream

    def stream(*args, **kwargs):
        first = None
        for event in original(*args, **kwargs):
            if first is None and hasattr(event, "step"):
                first = time.monotonic()
            yield event
        spans.append((first if first is not None else time.monotonic(), time.monotonic()))

    engine.stream = stream  # an attribute of this object: RayEngine.__getattr__ is not involved
    return spans


def overlapped(spans: list[tuple[float, float]]) -> bool:
    """Some two spans ran at the same time (one's first step before the other's end, both ways)."""
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


def test_two_requests_at_once_run_on_two_replicas(cluster):
    remote, _ = cluster
    replicas = []
    spans: list[tuple[float, float]] = []

    def one(seed: int) -> None:
        engine = RayEngine(remote.local, remote.handle)
        mine = running_spans(engine)
        engine.generate(request(seed).replace(steps=30))
        spans.extend(mine)
        replicas.append(engine.last_replica)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(set(replicas)) == 2, replicas  # two replicas answered...
    assert len(spans) == 2 and overlapped(spans), spans  # ...at the same time


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


def test_skip_on_a_replica_drops_the_running_batch_only(cluster):
    from webui.engine.control import GenerationControl

    remote, local = cluster
    control = GenerationControl()
    steps, saved = [], []
    asked = request(11).replace(steps=30, batch_count=3)
    result = None
    for event in remote.stream(asked, control=control, preview_every=0, on_batch=saved.extend):
        if hasattr(event, "step"):
            steps.append((event.batch, event.step))
            if event.batch == 2 and event.step == 2:
                control.skip()  # sent to the replica running this job
        else:
            result = event
    assert result is not None and not result.interrupted
    # batches 1 and 3 are whole (seeds 11 and 13), batch 2 stopped a step or two after the Skip
    assert [item.seed for item in result.images] == [11, 13] and [item.seed for item in saved] == [11, 13]
    assert max(step for batch, step in steps if batch == 2) < 30
    assert max(step for batch, step in steps if batch == 3) == 30
    alone = local.generate(request(13).replace(steps=30))
    assert np.array_equal(pixels(result)[1], pixels(alone)[0])


def test_a_model_that_fails_on_a_replica_gives_the_error_of_one_process(cluster, tmp_path):
    from webui.errors import LatentStudioError

    remote, local = cluster
    asked = request(1).replace(model="no-such-model")
    with pytest.raises(LatentStudioError) as alone:
        local.generate(asked)
    with pytest.raises(type(alone.value)) as over_ray:
        remote.generate(asked)
    assert str(over_ray.value) == str(alone.value) and "\n" not in str(over_ray.value)
    assert remote.generate(request(2)).images  # the replicas keep serving


def _kill_when(remote, asked, *, at_batch: int):
    """Run ``asked`` and kill the replica running it at step 3 of batch ``at_batch``; the result
    (or the error) and the seeds saved."""
    import ray

    from webui.engine.control import GenerationControl

    saved, killed = [], []
    outcome = None
    try:
        for event in remote.stream(
            asked, control=GenerationControl(), preview_every=0, on_batch=saved.extend
        ):
            if hasattr(event, "step") and not killed and event.batch == at_batch and event.step == 3:
                killed.append(remote.last_replica)
                ray.kill(ray.get_actor(remote.last_actor, namespace="serve"), no_restart=True)
            elif not hasattr(event, "step"):
                outcome = event
    except Exception as error:  # noqa: BLE001 - the test looks at it
        outcome = error
    return outcome, [item.seed for item in saved], killed


def _wait_for_two_replicas(remote) -> None:
    from waiting import wait_until

    def running() -> bool:
        status = serve.status().applications["latent-studio"].deployments["latent-studio-engine"]
        return status.replica_states.get("RUNNING", 0) == 2

    wait_until(running, timeout=120, what="Ray Serve bringing the lost replica back", interval=0.5)


def test_a_replica_killed_before_anything_came_back_is_retried_once_elsewhere(cluster):
    remote, local = cluster
    asked = request(21).replace(steps=40)
    result, saved, killed = _kill_when(remote, asked, at_batch=1)
    assert killed and remote.last_replica != killed[0]  # finished on another replica
    assert not getattr(result, "interrupted", True) and saved == [21]  # saved once, not twice
    assert np.array_equal(pixels(result), pixels(local.generate(asked)))
    _wait_for_two_replicas(remote)  # Ray Serve replaced the lost one
    assert remote.generate(request(4)).images


def test_a_replica_killed_after_a_batch_was_saved_fails_in_one_line_and_keeps_it(cluster):
    from webui.errors import ReplicaLost

    remote, _ = cluster
    _wait_for_two_replicas(remote)
    error, saved, killed = _kill_when(remote, request(31).replace(steps=40, batch_count=2), at_batch=2)
    assert killed and isinstance(error, ReplicaLost), error
    assert "1 image(s) saved" in str(error) and "\n" not in str(error)
    assert saved == [31]  # the first batch stays saved; nothing of the second
    _wait_for_two_replicas(remote)
    assert remote.generate(request(5)).images  # and the server keeps serving


def test_the_replicas_queue_full_is_the_busy_answer(cluster):
    from waiting import wait_until

    from webui.engine.control import GenerationControl
    from webui.errors import QueueFull

    remote, _ = cluster
    # an application of its own: one replica (on no reserved core), one request may wait in Ray's queue
    settings = ReplicaSettings(
        models_dir=remote.local.models.models_dir, default_model="tiny-a", preview_every=0
    )
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_queued_requests": 1}
    busy = RayEngine(remote.local, serve.run(deployment(settings, options), name="busy", route_prefix=None))
    controls = [GenerationControl() for _ in range(3)]
    stepping: set[int] = set()
    outcomes: dict[int, object] = {}

    def one(n: int) -> None:
        try:
            asked = request(40 + n).replace(steps=150, batch_count=8)
            for event in busy.stream(asked, control=controls[n], preview_every=0):
                if hasattr(event, "step"):
                    stepping.add(n)
                else:
                    outcomes[n] = event
        except QueueFull as error:
            outcomes[n] = error

    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    try:
        threads[0].start()
        wait_until(lambda: 0 in stepping, timeout=120, what="the replica running")
        threads[1].start()
        threads[2].start()  # one of these two waits in Ray's queue, the other gets the busy answer
        wait_until(lambda: len(outcomes) == 1, timeout=60, what="the busy answer")
    finally:
        for control in controls:
            control.interrupt()
        for thread in threads:
            thread.join(120)
        serve.delete("busy")
    refused = [outcome for outcome in outcomes.values() if isinstance(outcome, QueueFull)]
    assert len(refused) == 1 and str(refused[0]).startswith("The server is busy"), outcomes
    assert "\n" not in str(refused[0]) and getattr(outcomes[0], "interrupted", False)


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
        spans = running_spans(server.engine)
        client = server.client()
        jobs = [
            submit(client, "txt2img", Prompt="a red circle", Steps=30, **{"Seed (-1 = random)": seed})
            for seed in (3, 4)
        ]
        for job in jobs:
            assert job.result(timeout=300)[0].startswith("1 image(s) in")
        assert len(spans) == 2 and overlapped(spans), spans  # side by side, not one after the other
    finally:
        server.close()


def test_the_http_apis_jobs_run_on_the_replicas_side_by_side(cluster, tmp_path):
    import base64
    import io

    import httpx
    from PIL import Image
    from ui_server import Server

    server = Server(tmp_path / "outputs", "--api", "--ray", "--replicas", "2")
    try:
        spans = running_spans(server.engine)
        body = {"prompt": "a red circle", "steps": 30, "sampler_name": "Euler"}
        answers: list = [None, None]
        with httpx.Client(base_url=server.url, timeout=300) as api:

            def one(n: int) -> None:
                answers[n] = api.post("/sdapi/v1/txt2img", json={**body, "seed": 3 + n})

            threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
        assert all(answer is not None and answer.status_code == 200 for answer in answers), answers
        assert len(spans) == 2 and overlapped(spans), spans  # two jobs at once, one per replica
        for seed, answer in zip((3, 4), answers, strict=True):
            image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
            assert image.size == (64, 64) and json_seed(answer.json()) == seed
    finally:
        server.close()


def json_seed(answer: dict) -> int:
    import json

    return json.loads(answer["info"])["seed"]


def test_a_serve_config_builds_the_application_from_the_environment(monkeypatch, tmp_path):
    from webui.errors import InvalidRequestError
    from webui.serve.app import settings_from_env

    settings = settings_from_env(
        {
            "LATENT_STUDIO_MODELS_DIR": str(tmp_path),
            "LATENT_STUDIO_MODEL": "tiny-a",
            "LATENT_STUDIO_REPLICA_CACHE": "3",
        }
    )
    assert (settings.models_dir, settings.default_model, settings.cache_size) == (str(tmp_path), "tiny-a", 3)
    with pytest.raises(InvalidRequestError, match="LATENT_STUDIO_REPLICA_CACHE"):
        settings_from_env({"LATENT_STUDIO_REPLICA_CACHE": "lots"})
