"""Hostile and careless requests against a real server and the real command line.

Each case once froze the server, downloaded what a stranger asked for, or ended in a traceback.
Now each gets a one-line message, and after each the server still answers; a request that runs
while another user asks for the page config must not hold that user up (measured as a ratio to an
idle ``GET /config``, never as a wall-clock bound). More hostile cases live with the parts they
test: ``test_linear_time.py`` (parsers), ``test_web_hardening.py`` (bodies, uploads, CORS, logins,
PNG Info), ``test_plugin_failures.py`` (plugins), ``test_nothing_lost.py`` (saving).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin
from ui_server import Server, call

from webui.limits import Limits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = {"Steps": 2, "Seed (-1 = random)": 3}
SLOWDOWN_RATIO = 100  # a config request during a hostile one may be this much slower than idle, not more


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("outputs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def config_seconds(server: Server) -> float:
    started = time.perf_counter()
    response = httpx.get(server.url + "config", timeout=120)
    assert response.status_code == 200
    assert "components" in response.json()
    return time.perf_counter() - started


def still_serving(server: Server) -> None:
    config_seconds(server)


def answered_promptly_during(server: Server, hostile: Callable[[], object]) -> object:
    """Run ``hostile`` in a thread while ``GET /config`` is asked again and again; assert the median
    answer during it is at most :data:`SLOWDOWN_RATIO` times the idle one. Returns what it returned
    (or raised)."""
    idle = statistics.median(config_seconds(server) for _ in range(5))
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(hostile())
        except Exception as error:  # the hostile request's own answer, checked by the caller
            outcome.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    during = [config_seconds(server)]
    while worker.is_alive():
        during.append(config_seconds(server))
    worker.join()
    floor = max(idle, 0.002)
    assert statistics.median(during) <= SLOWDOWN_RATIO * floor, (idle, during)
    return outcome[0]


# -- prompts: bounded by the limits, parsed in linear time ------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        (" " * 1_000_000, ""),  # 1 MB prompt: once held the only generation slot for 739 s
        ("a red circle", "blurry " * 150_000),  # 1 MB negative prompt: once kept the device busy 24 minutes
        (" " * 30_000, ""),  # once 21 s in the BREAK pattern while every other user waited
        ("<a:" * 20_000, ""),  # once 280 s in the extra-network tag pattern
    ],
    ids=["1MB-prompt", "1MB-negative", "30k-spaces", "60KB-tags"],
)
def test_oversized_prompts_are_refused_at_once_naming_the_flag(server, client, prompt, negative):
    def hostile() -> object:
        return call(client, "txt2img", Prompt=prompt, **{"Negative prompt": negative}, **FAST)

    error = answered_promptly_during(server, hostile)
    assert isinstance(error, AppError)
    message = str(error)
    assert "characters, over this server's limit of 10000 (--max-prompt-chars)" in message
    assert "\n" not in message.strip()
    still_serving(server)


def test_hostile_prompts_within_the_limits_run_without_holding_anyone_up(server, client):
    prompt = " " * 9_980 + "a red circle"  # the spaces that were quadratic, within the character limit
    result = answered_promptly_during(server, lambda: call(client, "txt2img", Prompt=prompt, **FAST))
    assert not isinstance(result, Exception), result
    assert result[0].startswith("1 image(s) in")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("(" * 3_000 + "a red circle", "weights must stay within ±100"),  # 1.1**3000: the image would be NaN
        ("<a:" * 3_000, "over this server's limit of 32 (--max-prompt-chunks)"),
        ("<x:y>" * 1_400, "only LoRA extra networks are supported"),
    ],
    ids=["3k-brackets", "open-tags", "unknown-networks"],
)
def test_hostile_prompts_within_the_character_limit_get_a_message(server, client, prompt, message):
    error = answered_promptly_during(server, lambda: call(client, "txt2img", Prompt=prompt, **FAST))
    assert isinstance(error, AppError)
    assert message in str(error) and "\n" not in str(error).strip()
    still_serving(server)


def test_too_many_steps_pixels_or_images_name_their_flags(server, client):
    with pytest.raises(AppError, match=r"Steps 10000 is over this server's limit of 150 \(--max-steps\)"):
        call(client, "txt2img", Prompt="x", Steps=10_000)
    with pytest.raises(AppError, match=r"Width 4096 is over this server's limit of 2048 \(--max-pixels\)"):
        call(client, "txt2img", Prompt="x", Width=4096, Height=64, Steps=2)
    with pytest.raises(AppError, match=r"Batch count 100 is over this server's limit of 64 \(--max-batch\)"):
        call(client, "txt2img", Prompt="x", **{"Batch count": 100})
    with pytest.raises(
        AppError,
        match=r"8 x 64 = 512 images were asked for, over this server's limit of 64 "
        r"\(--max-batch\)",
    ):
        call(client, "txt2img", Prompt="x", **{"Batch count": 64, "Batch size": 8})
    still_serving(server)


def test_the_controls_show_the_limits_as_their_ranges(server):
    limits = Limits()
    components = httpx.get(server.url + "config", timeout=60).json()["components"]
    by_id = {c["props"].get("elem_id"): c["props"] for c in components if c["props"].get("elem_id")}
    assert by_id["txt2img-steps"]["maximum"] == limits.max_steps
    assert by_id["txt2img-width"]["maximum"] == 2048
    assert by_id["txt2img-prompt"]["max_length"] == limits.max_prompt_chars


def raw_predict(server: Server, api_name: str, **by_elem_id: object) -> dict:
    """Call ``api_name`` with hand-written JSON (``\\ud800`` escapes and all, which gradio_client
    cannot send) through the queue; the ``process_completed`` message."""
    config = httpx.get(server.url + "config", timeout=60).json()
    components = {c["id"]: c for c in config["components"]}
    index, dependency = next(
        (i, d) for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name
    )
    data = []
    for component_id in dependency["inputs"]:
        props = components[component_id]["props"]
        data.append(by_elem_id.get(props.get("elem_id"), props.get("value")))
    session = "hostile-" + str(time.time_ns())
    body = json.dumps(
        {
            "data": data,
            "fn_index": index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": dependency.get("targets", [[None]])[0][0],
        }
    )  # ensure_ascii: \\ud800 as text
    joined = httpx.post(
        server.url + "gradio_api/queue/join",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert joined.status_code == 200, joined.text
    with httpx.stream(
        "GET", server.url + f"gradio_api/queue/data?session_hash={session}", timeout=120
    ) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event stream ended without process_completed")


def test_a_lone_surrogate_gets_a_message_not_an_internal_error(server):
    for field, name in (("txt2img-prompt", "prompt"), ("txt2img-negative-prompt", "negative prompt")):
        message = raw_predict(server, "txt2img", **{field: "a\ud800b", "txt2img-steps": 2})
        assert message["success"] is False
        error = message["output"]["error"]
        assert f"the {name} is not valid text: character 2 is a lone surrogate" in error, error
        assert "TypeError" not in error
    still_serving(server)


# -- downloads are the owner's decision ---------------------------------------------------------------


def test_web_users_cannot_make_the_server_download(server, client, monkeypatch):
    from webui.builtin import loaders

    fetched: list[str] = []
    monkeypatch.setattr(loaders, "_download", lambda repo, kind: fetched.append(repo))
    with pytest.raises(AppError, match="--allow-download"):
        call(client, "txt2img", Prompt="x", Model="some-org/some-model", **FAST)
    assert fetched == []
    still_serving(server)


def test_with_allow_download_the_owner_lets_the_web_app_fetch(tmp_path, monkeypatch):
    from webui.builtin import loaders

    fetched: list[str] = []

    def fake_download(repo: str, kind: str) -> Path:  # stands in for the hub: no network in tests
        fetched.append(repo)
        return REPO_ROOT / "models" / "latent-studio-shapes"

    monkeypatch.setattr(loaders, "_download", fake_download)
    allowed = Server(tmp_path / "outputs", "--allow-download")
    try:
        progress = call(
            allowed.client(), "txt2img", Prompt="a red circle", Model="some-org/some-model", **FAST
        )[0]
    finally:
        allowed.close()
    assert fetched == ["some-org/some-model"]
    assert progress.startswith("1 image(s) in")


# -- the command line: one line, exit 2, never a traceback --------------------------------------------


def launch(*args: str | bytes | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
        check=False,
    )


def one_line_error(process: subprocess.CompletedProcess[str]) -> str:
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    return lines[0]


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length, b"IHDR", width, height, ...
    body = (
        bytes(data[ihdr + 4 : ihdr + 8])
        + struct.pack(">II", width, height)
        + bytes(data[ihdr + 16 : ihdr + 21])
    )
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(body))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("flag", ["--init-image", "--seg-map"])
def test_cli_decompression_bomb_images(tmp_path, flag):
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    line = one_line_error(launch("generate", "--prompt", "x", flag, bomb, "--out", tmp_path / "out"))
    assert line.startswith("error: ") and "too large" in line
    assert not (tmp_path / "out").exists()


def test_cli_prompt_in_another_encoding(tmp_path):
    prompt = "caf\xe9".encode("latin-1")  # not UTF-8: arrives as a lone surrogate
    line = one_line_error(launch("generate", "--prompt", prompt, "--out", tmp_path / "out"))
    assert "the prompt is not valid text: character 4 is a lone surrogate" in line


def test_cli_limits_and_their_flags(tmp_path):
    line = one_line_error(
        launch("generate", "--prompt", "x", "--steps", "12", "--max-steps", "10", "--out", tmp_path / "out")
    )
    assert line == "error: 12 steps were asked for, over this server's limit of 10 (--max-steps)"
    process = launch("--max-pixels", "-1", "generate", "--prompt", "x")
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert "--max-pixels: must be 0 (no limit) or more, got -1" in process.stderr


def test_a_huge_infotext_in_an_uploaded_png_stays_bounded(server, client, tmp_path):
    """5 MB of parameters once froze the server until restart."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a: b, " * 900_000)
    path = tmp_path / "huge-text.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    from gradio_client import handle_file

    def hostile() -> object:
        return client.predict(handle_file(str(path)), api_name="/pnginfo")

    result = answered_promptly_during(server, hostile)
    assert not isinstance(result, Exception), result
    text, parsed, notes = result
    assert text == "" and parsed is None
    assert "--max-infotext-chars" in notes and "\n" not in notes.strip()
    still_serving(server)
