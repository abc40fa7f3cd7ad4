"""Jobs over HTTP: created at once, followed through server-sent events to their images, cancelled
while queued and while running, private to their user, and refused with 503 when the one device
queue (shared with the web app) is full. Also the job manager alone, with a stand-in runner."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from ui_server import Server, arguments
from waiting import wait_until

from webui.http.jobs import JobManager, QueueFull
from webui.metadata import read_png_parameters
from webui.ui.app import BUSY_MESSAGE

pytestmark = pytest.mark.timeout(300)

ALICE = ("alice", "wonderland")
BOB = ("bob", "builder99")
QUICK = {
    "prompt": "a large red circle",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 11,
    "sampler_name": "Euler a",
}
LONG = {"prompt": "a long one", "steps": 150, "n_iter": 30, "width": 64, "height": 64, "seed": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("outputs"),
        "--api",
        "--api-auth",
        f"{ALICE[0]}:{ALICE[1]},{BOB[0]}:{BOB[1]}",
        "--queue-size",
        "2",
        "--preview-every",
        "2",
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def alice(server):
    with httpx.Client(base_url=server.url, auth=ALICE, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with httpx.Client(base_url=server.url, auth=BOB, timeout=120) as client:
        yield client


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Every event of a job's stream until it ends."""
    found: list[tuple[str, dict]] = []
    name = None
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                found.append((name, json.loads(line[len("data: ") :])))
    return found


def wait_for(client: httpx.Client, job_id: str, state: str, timeout: float = 240) -> dict:
    """The job's view once it is in ``state`` or has ended."""

    def view() -> dict | None:
        found = client.get(f"/api/v1/jobs/{job_id}").json()
        return found if found["state"] == state or found["state"] in ("done", "failed", "cancelled") else None

    return wait_until(view, timeout=timeout, what=f"job {job_id} reaching {state!r}")


@pytest.mark.slow
def test_a_job_followed_through_its_events_to_its_images(alice):
    created = alice.post("/api/v1/jobs", json={**QUICK, "task": "txt2img", "batch_size": 2})
    assert created.status_code == 202
    job = created.json()
    assert job["state"] in ("queued", "running") and job["id"]
    stream = events(alice, job["id"])
    names = [name for name, _ in stream]
    assert names[-1] == "done" and "state" in names
    running = [data for name, data in stream if name == "state" and data["state"] == "running"]
    assert running and all(data["steps"] == 4 for data in running)
    previews = [data for name, data in stream if name == "preview"]
    assert previews and Image.open(io.BytesIO(base64.b64decode(previews[0]["image"]))).format == "PNG"
    final = stream[-1][1]
    assert final["seeds"] == [11, 12] and len(final["images"]) == 2 and final["progress"] == 1
    first = alice.get(final["images"][0])
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (64, 64) and read_png_parameters(image) == final["infotexts"][0]
    same = alice.post("/sdapi/v1/txt2img", json={**QUICK, "batch_size": 2}).json()  # the same, synchronously
    assert np.array_equal(
        np.asarray(image), np.asarray(Image.open(io.BytesIO(base64.b64decode(same["images"][0]))))
    )
    assert alice.get(f"/api/v1/jobs/{job['id']}/images/2").status_code == 404
    assert alice.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "done"
    assert job["id"] in [item["id"] for item in alice.get("/api/v1/jobs").json()]


@pytest.mark.slow
def test_jobs_for_other_tasks(alice):
    init = Image.new("RGB", (64, 64), (10, 10, 200))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    job = alice.post(
        "/api/v1/jobs", json={**QUICK, "init_images": [encoded], "denoising_strength": 0.5}
    ).json()
    assert job["task"] == "img2img"
    assert wait_for(alice, job["id"], "done")["state"] == "done"
    refused = alice.post("/api/v1/jobs", json={**QUICK, "task": "inpaint", "init_images": [encoded]})
    assert refused.status_code == 422 and "mask" in refused.json()["detail"]
    assert alice.post("/api/v1/jobs", json={**QUICK, "task": "upscale"}).status_code == 422


@pytest.mark.slow
def test_two_users_do_not_see_each_others_jobs(alice, bob):
    job = alice.post("/api/v1/jobs", json=QUICK).json()
    wait_for(alice, job["id"], "done")
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/images/0"), ("DELETE", "")):
        response = bob.request(method, f"/api/v1/jobs/{job['id']}{path}")
        assert response.status_code == 404 and "no job" in response.json()["detail"]
    assert job["id"] not in [item["id"] for item in bob.get("/api/v1/jobs").json()]
    assert alice.get(f"/api/v1/jobs/{job['id']}/images/0").status_code == 200


@pytest.mark.slow
def test_cancel_while_queued_and_while_running_and_the_busy_answer(alice, bob, server):
    long = alice.post("/api/v1/jobs", json=LONG).json()
    running = wait_for(alice, long["id"], "running")
    assert running["state"] == "running"
    # progress of the caller's running job, with a preview unless asked not to
    progress = alice.get("/sdapi/v1/progress").json()
    while progress["current_image"] is None and progress["current_task"] == long["id"]:
        progress = alice.get("/sdapi/v1/progress").json()
    assert progress["current_task"] == long["id"] and progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] == 30 and 0 <= progress["progress"] < 1
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).format == "PNG"
    assert (
        alice.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    )
    assert bob.get("/sdapi/v1/progress").json()["current_task"] is None  # not bob's job
    # the queue holds 2 (--queue-size 2): the third waiting generation is refused with 503
    first = alice.post("/api/v1/jobs", json=QUICK).json()
    second = bob.post("/api/v1/jobs", json=QUICK).json()
    assert (first["state"], first["position"], second["position"]) == ("queued", 1, 2)
    busy = alice.post("/api/v1/jobs", json=QUICK)
    assert (
        busy.status_code == 503 and "busy" in busy.json()["detail"] and int(busy.headers["retry-after"]) >= 1
    )
    sync_busy = bob.post("/sdapi/v1/txt2img", json=QUICK)
    assert sync_busy.status_code == 503
    # the web app's Generate meets the same bound, with the same message
    web = server.client()
    fn_index = next(d["id"] for d in web.config["dependencies"] if d.get("api_name") == "txt2img")
    reply = httpx.post(
        f"{server.url}gradio_api/queue/join",
        json={
            "data": arguments(web, "txt2img", Prompt="x"),
            "fn_index": fn_index,
            "session_hash": "busy-test",
            "event_data": None,
            "trigger_id": None,
        },
    )
    assert reply.status_code == 503 and reply.json()["detail"] == BUSY_MESSAGE.format(size=2)
    assert busy.json()["detail"] == BUSY_MESSAGE.format(size=2)
    # cancelled while queued: it leaves the queue at once, and the one behind moves up
    cancelled = alice.delete(f"/api/v1/jobs/{first['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["images"] == []
    assert bob.get(f"/api/v1/jobs/{second['id']}").json()["position"] == 1
    # cancelled while running: interrupted after its current step
    assert alice.delete(f"/api/v1/jobs/{long['id']}").status_code == 200
    stopped = wait_for(alice, long["id"], "cancelled")
    assert stopped["state"] == "cancelled" and stopped["step"] < 150
    assert wait_for(bob, second["id"], "done")["state"] == "done"  # the queue goes on


@pytest.mark.slow
def test_interrupt_route_stops_only_the_callers_job(alice, bob):
    long = alice.post("/api/v1/jobs", json=LONG).json()
    wait_for(alice, long["id"], "running")
    bob.post("/sdapi/v1/interrupt")  # not bob's job: nothing happens
    assert alice.get(f"/api/v1/jobs/{long['id']}").json()["state"] == "running"
    alice.post("/sdapi/v1/interrupt")
    assert wait_for(alice, long["id"], "cancelled")["state"] == "cancelled"


# -- the job manager alone -----------------------------------------------------------------------


class Step:
    def __init__(self, step: int, total: int) -> None:
        self.step, self.total, self.preview = step, total, None


def test_job_manager_order_failure_and_retention():
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def run(job):
        if job.request == "wait":
            started.set()
            gate.wait(30)
        if job.request == "boom":
            raise RuntimeError("the device fell over\nsecond line")
        ran.append(job.request)
        yield Step(1, 1)
        yield {"result": job.request}

    manager = JobManager(run, stop=lambda job: gate.set(), max_waiting=2, keep_count=2)
    try:
        blocker = manager.submit("a", "txt2img", "wait")
        assert started.wait(30) and manager.running() is blocker
        queued = [manager.submit("a", "txt2img", name) for name in ("one", "boom")]
        with pytest.raises(QueueFull):
            manager.submit("b", "txt2img", "three")
        assert [manager.position(job) for job in queued] == [1, 2]
        assert manager.get(queued[0].id, "b") is None  # another owner's job is not found
        gate.set()
        for job in queued:
            assert manager.wait_finished(job, timeout=30)
        assert queued[0].state == "done" and queued[0].result == {"result": "one"}
        assert (
            queued[1].state == "failed"
            and queued[1].error == "generation failed: RuntimeError: the device fell over"
        )
        assert ran == ["wait", "one"]
        assert len(manager.jobs("a")) == 2  # keep_count: the oldest finished job is forgotten
    finally:
        manager.close()


def test_several_workers_run_jobs_side_by_side_and_interrupt_finds_the_owners_job():
    import contextlib

    gates = {name: threading.Event() for name in ("alice-1", "bob-1", "alice-2")}
    running = threading.Semaphore(0)
    turns = threading.BoundedSemaphore(2)  # the device's turns: two replicas

    @contextlib.contextmanager
    def turn():
        with turns:
            yield

    def run(job):
        running.release()
        gates[job.request].wait(30)
        yield {"result": job.request, "interrupted": job.interrupted}

    manager = JobManager(run, stop=lambda job: gates[job.request].set(), turn=turn, workers=2)
    try:
        first = manager.submit("alice", "txt2img", "alice-1")
        second = manager.submit("bob", "txt2img", "bob-1")
        third = manager.submit("alice", "txt2img", "alice-2")
        assert running.acquire(timeout=30) and running.acquire(timeout=30)  # two at once
        assert (first.state, second.state, third.state) == ("running", "running", "queued")
        assert manager.position(third) == 1 and manager.running() is first  # the longest running
        assert manager.interrupt("bob") is second  # bob's own job, not the oldest one
        assert manager.wait_finished(second, timeout=30) and second.state == "cancelled"
        assert running.acquire(timeout=30) and third.state == "running"  # the freed turn goes on
        assert manager.interrupt("nobody") is None
    finally:
        manager.close()
    assert first.finished and third.finished  # close stopped every running job, not only one


def test_retention_flags_reach_the_job_manager_and_bad_values_are_refused(capsys, tmp_path):
    from webui.cli import build_parser
    from webui.http.auth import ApiSettings
    from webui.http.routes import build_api, close_api
    from webui.testing import make_engine
    from webui.ui.service import StudioService

    args = build_parser().parse_args(["--job-keep-seconds", "5", "--job-keep-count", "3"])
    service = StudioService(make_engine(), tmp_path)
    api = build_api(service, ApiSettings(enabled=True, web=True), max_waiting=2, args=args)
    try:
        assert (api.state.api.jobs.keep_seconds, api.state.api.jobs.keep_count) == (5.0, 3)
    finally:
        close_api(api)
    for flag, value in (
        ("--job-keep-seconds", "nan"),
        ("--job-keep-seconds", "-1"),
        ("--job-keep-count", "0"),
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args([flag, value])
        assert "must be" in capsys.readouterr().err
