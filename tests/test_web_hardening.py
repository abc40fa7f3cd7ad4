"""The web server against hostile and careless requests: each case gets a status code or a one-line
message, and the server keeps serving after every one of them.

One real server (logins on, a small upload cap, one extra CORS origin, an outputs folder that
cannot be created) serves the HTTP cases; the parsers and the login throttle are also tested
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from ui_server import Server, call, call_named
from waiting import wait_until

from webui.fields import FieldRegistry
from webui.limits import Limits
from webui.ui.infotext import Range, clamp_fields, fields_from_infotext
from webui.ui.security import LoginThrottle, guard_image_input, guard_uploads, same_origin
from webui.ui.server import LaunchRefused, exposure_problem, outputs_problem, parse_origins, read_auth

pytestmark = pytest.mark.timeout(300)

USER, PASSWORD = "alice", "s3cret pass"
FRIEND = "https://friend.example"
MAX_UPLOAD_MB = 8  # the body limit is an upload of this size sent inline as base64: 8 * 4/3 + 1 = 11.7 MB
EDITOR = "Image and mask: upload, then paint over what should change"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening")
    (folder / "a-file").write_text("not a folder")
    records = Records()
    logging.getLogger("webui").addHandler(records)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        server = Server(
            folder / "a-file" / "outputs",
            "--auth",
            f" {USER} : {PASSWORD} ",
            "--max-upload-mb",
            str(MAX_UPLOAD_MB),
            "--cors-allow-origins",
            f"{FRIEND}/",
        )
    server.printed = printed.getvalue()
    server.records = records
    yield server
    server.close()
    logging.getLogger("webui").removeHandler(records)


@pytest.fixture(scope="module")
def web(server):
    """A logged-in HTTP client (from its own address, so the login-throttle tests never block it)."""
    with httpx.Client(base_url=server.url, headers={"x-forwarded-for": "10.9.9.9"}, timeout=60) as web:
        assert web.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        yield web


@pytest.fixture(scope="module")
def client(server):
    return server.client(auth=(USER, PASSWORD))


def serving(web: httpx.Client) -> bool:
    response = web.get("/config")
    return response.status_code == 200 and "components" in response.json()


def one_line_without_paths(message: str) -> None:
    assert "\n" not in message and "/tmp" not in message and "gradio" not in message.lower(), message


# -- request body size ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_oversized_body_is_refused_on_every_route_and_the_server_keeps_serving(server, web):
    inline = "data:image/png;base64," + "A" * (12 * 2**20)  # an image sent inline, past the limit
    body = json.dumps(
        {"data": [{"url": inline, "meta": {"_type": "gradio.FileData"}}], "fn_index": 0, "session_hash": "x"}
    )
    for route in ("/gradio_api/queue/join", "/login", "/gradio_api/upload", "/no-such-route"):
        response = web.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413, route
        message = response.json()["detail"]
        one_line_without_paths(message)
        assert "--max-upload-mb 8" in message and "11.7 MB" in message
        assert serving(web)
    # no login needed to be refused: the size is checked first
    assert httpx.post(server.url + "gradio_api/queue/join", content=body).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(14):
            yield b"x" * 2**20

    response = web.post(
        "/gradio_api/queue/join", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]
    assert serving(web)
    # under the limit, a chunked body still goes through to the app (which answers it as usual)
    response = web.post(
        "/gradio_api/queue/join", content=iter([b"{", b"}"]), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


# -- CORS ----------------------------------------------------------------------------------------


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-")}


@pytest.mark.slow
def test_cors_allows_only_the_servers_own_origin_and_the_listed_ones(server, web):
    own = server.url.rstrip("/")
    for origin in (
        "https://evil.example",
        "null",
        f"http://localhost:{server.port + 1}",
        own.replace("http", "https"),
    ):
        response = web.get("/config", headers={"origin": origin})
        assert response.status_code == 200 and cors_headers(response) == {}, origin
        preflight = web.options(
            "/gradio_api/queue/join", headers={"origin": origin, "access-control-request-method": "POST"}
        )
        assert preflight.status_code == 400 and cors_headers(preflight) == {}, origin
        assert "\n" not in preflight.json()["detail"]
    for origin in (own, FRIEND):
        response = web.get("/config", headers={"origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "origin" in response.headers["vary"].lower()
        preflight = web.options(
            "/gradio_api/queue/join",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "x-a",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-headers"] == "x-a"
    # reached by a network name (as with --listen), a foreign origin is still not reflected
    host = f"box.lan:{server.port}"
    response = web.get("/config", headers={"host": host, "origin": "https://evil.example"})
    assert response.status_code == 200 and cors_headers(response) == {}
    response = web.get("/config", headers={"host": host, "origin": f"http://{host}"})
    assert response.headers["access-control-allow-origin"] == f"http://{host}"
    assert serving(web)


def test_origin_rules():
    assert same_origin("http://box.lan:7860", "box.lan:7860")
    assert same_origin("https://box.lan", "box.lan", "https") and same_origin("http://box.lan:80", "box.lan")
    assert not same_origin("https://box.lan:7860", "box.lan:7860")  # another scheme is another origin
    assert not same_origin("http://box.lan:7861", "box.lan:7860")
    assert not same_origin("http://evil.example", "box.lan:7860")
    assert not same_origin("null", "box.lan:7860")
    assert not same_origin("http://box.lan:7860", None)
    assert parse_origins(" https://a.example/, http://b.example:8080 ,*") == (
        "https://a.example",
        "http://b.example:8080",
        "*",
    )
    for bad in (
        "a.example",
        "ftp://a.example",
        "https://a.example/path",
        "http://a.example:99999",
        "http://[x",
    ):
        with pytest.raises(ValueError, match="is not an origin like"):
            parse_origins(bad)


# -- logins --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_logins_are_slowed_per_address_and_logged(server):
    def login(password: str, address: str) -> httpx.Response:
        return httpx.post(
            server.url + "login",
            data={"username": USER, "password": password},
            headers={"x-forwarded-for": address},
        )

    start = len(server.records.lines)
    for _ in range(5):
        assert login("wrong", "10.0.0.1").status_code == 400
    refused = login(PASSWORD, "10.0.0.1")  # even the right password waits now
    assert refused.status_code == 429
    assert (
        refused.json()["detail"] == f"too many failed logins, try again in {refused.headers['retry-after']} s"
    )
    assert login(PASSWORD, "10.0.0.2").status_code == 200  # another address is not affected
    lines = server.records.lines[start:]
    assert [line for line in lines if line.startswith("failed login")] == [
        f"failed login for user '{USER}' from 10.0.0.1"
    ] * 5
    assert not any("wrong" in line or PASSWORD in line for line in lines)
    # after the wait the right password works (attempts during the wait are refused, not counted)
    wait_until(
        lambda: login(PASSWORD, "10.0.0.1").status_code == 200,
        timeout=int(refused.headers["retry-after"]) + 30,
        what="a login after the wait",
        interval=0.2,
    )
    assert login("wrong", "10.0.0.1").status_code == 400  # and the count started afresh


def test_the_login_throttle():
    now = [1000.0]
    throttle = LoginThrottle(
        free=5, delay=2.0, max_delay=10.0, forget_after=300.0, max_addresses=3, clock=lambda: now[0]
    )
    assert [throttle.begin("a") for _ in range(5)] == [0.0] * 5  # five attempts, all failed
    assert throttle.begin("a") == 2.0 and throttle.begin("b") == 0.0
    now[0] += 2.0
    assert throttle.begin("a") == 0.0  # the sixth attempt, after the wait; it fails too
    assert throttle.begin("a") == 4.0  # the wait doubles
    now[0] += 4.0
    for expected in (8.0, 10.0, 10.0):  # ... up to max_delay
        assert throttle.begin("a") == 0.0
        assert throttle.begin("a") == expected
        now[0] += expected
    throttle.begin("a")
    throttle.succeeded("a")  # a success starts afresh
    assert [throttle.begin("a") for _ in range(5)] == [0.0] * 5 and throttle.begin("a") > 0
    now[0] += 301.0  # forgotten after a quiet while
    assert throttle.begin("a") == 0.0
    for address in ("c", "d", "e"):  # only max_addresses are remembered, the oldest go first
        throttle.begin(address)
    assert "a" not in throttle._attempts and len(throttle._attempts) == 3
    assert LoginThrottle.message(0.2) == "too many failed logins, try again in 1 s"


def test_auth_parsing(tmp_path):
    assert read_auth(" alice : s3cret , bob:pa:ss ", None) == [("alice", "s3cret"), ("bob", "pa:ss")]
    text = "# logins\n carol : one two \n\ndave:x\n"
    for name, data in {
        "utf8.txt": text.encode("utf-8"),
        "bom.txt": b"\xef\xbb\xbf" + text.encode("utf-8"),
        "utf16le.txt": text.encode("utf-16"),
        "utf16be.txt": b"\xfe\xff" + text.encode("utf-16-be"),
    }.items():
        (tmp_path / name).write_bytes(data)
        assert read_auth(None, tmp_path / name) == [("carol", "one two"), ("dave", "x")], name
    # malformed entries are named by position; nothing of them is repeated (it may be a password)
    for auth, where in (
        ("alice:ok,hunter2", "--auth login 2"),
        ("alice: ", "--auth login 1"),
        (":hunter2", "--auth login 1"),
    ):
        with pytest.raises(LaunchRefused) as refused:
            read_auth(auth, None)
        assert str(refused.value).startswith(where) and "hunter2" not in str(refused.value)
    (tmp_path / "bad.txt").write_text("alice:ok\nhunter2\n")
    with pytest.raises(LaunchRefused, match="bad.txt:2: a login must look like USER:PASS") as refused:
        read_auth(None, tmp_path / "bad.txt")
    assert "hunter2" not in str(refused.value)
    (tmp_path / "nobom.txt").write_bytes("alice:hunter2\n".encode("utf-16-le"))
    with pytest.raises(LaunchRefused, match="UTF-16 without a byte order mark"):
        read_auth(None, tmp_path / "nobom.txt")
    (tmp_path / "latin1.txt").write_bytes("jos\xe9:hunter2\n".encode("latin-1"))
    with pytest.raises(LaunchRefused, match="is not UTF-8 or UTF-16 text") as refused:
        read_auth(None, tmp_path / "latin1.txt")
    assert "hunter2" not in str(refused.value)


# -- flags and start-up --------------------------------------------------------------------------


def test_numeric_flags_are_range_checked():
    from webui.cli import build_parser

    def problem(*argv: str) -> str | None:
        return exposure_problem(build_parser().parse_args(list(argv)), [])

    assert problem() is None
    assert problem("--max-upload-mb", "-1") == "--max-upload-mb must be a number of megabytes above 0, got -1"
    assert problem("--max-upload-mb", "nan").startswith("--max-upload-mb must be")
    assert problem("--max-upload-mb", "0").startswith("--max-upload-mb must be")
    assert problem("--preview-every", "-1") == "--preview-every must be 0 (off) or more, got -1"
    assert problem("--queue-size", "0") == "--queue-size must be at least 1, got 0"
    assert problem("--port", "70000") == "--port must be between 1 and 65535, got 70000"
    assert problem("--cors-allow-origins", "example.com") == (
        "--cors-allow-origins: 'example.com' is not an origin like https://example.com"
    )


@pytest.mark.slow
def test_an_unwritable_outputs_folder_is_reported_at_start_and_the_server_serves(server, web, tmp_path):
    assert "warning: " in server.printed and "a-file/outputs is not a writable folder" in server.printed
    assert any("is not a writable folder" in line for line in server.records.lines)
    assert serving(web)
    assert outputs_problem(tmp_path / "new" / "outputs") is None and (tmp_path / "new" / "outputs").is_dir()


# -- uploads -------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit PNG whose header says side x side pixels, in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (side // 8 + 1) * 16, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    Image.new("RGB", (64, 64), "red").save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return {
        "bomb": (
            bomb_png(folder / "bomb.png"),
            "is too large: 20000x20000 is 400000000 pixels, the limit is",
        ),
        "truncated": (folder / "truncated.png", "is not a readable image"),
        "text": (folder / "text.png", "is not a readable image"),
        "empty": (folder / "empty.png", "is an empty file"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bomb", "truncated", "text", "empty"])
def test_upload_problems_give_one_line_without_paths(client, web, bad_files, case):
    path, expected = bad_files[case]
    with pytest.raises(AppError) as refused:
        call(client, "img2img", Prompt="x", Steps=2, **{"Init image": handle_file(str(path))})
    assert str(refused.value).startswith(f"init image {expected}")
    one_line_without_paths(str(refused.value))
    with pytest.raises(AppError) as refused:
        call(
            client,
            "inpaint",
            Prompt="x",
            Steps=2,
            **{EDITOR: {"background": handle_file(str(path)), "layers": [], "composite": None}},
        )
    assert str(refused.value).startswith(f"image {expected}")
    one_line_without_paths(str(refused.value))
    with pytest.raises(AppError) as refused:
        call(client, "seg2img", Prompt="x", Steps=2, **{"Segmentation map": handle_file(str(path))})
    assert str(refused.value).startswith(f"segmentation map {expected}")
    one_line_without_paths(str(refused.value))
    if case != "truncated":  # PNG Info reads the text chunks of a damaged file as far as they go
        with pytest.raises(AppError) as refused:
            call(client, "pnginfo", **{"Drop an image": handle_file(str(path))})
        assert str(refused.value).startswith(f"image {expected}")
    assert serving(web)


def test_guards_follow_the_copies_gradio_makes_for_a_session(tmp_path):
    import gradio as gr

    bomb = bomb_png(tmp_path / "bomb.png")
    with gr.Blocks():
        original = guard_image_input(gr.Image(type="filepath"), "init image")
    copy = gr.Image(type="filepath", render=False)  # what gradio builds when an update changes a property
    copy._id = original._id
    seen = []

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        seen.append(state[original._id].preprocess)
        return inputs

    demo = SimpleNamespace(preprocess_data=preprocess_data)
    guard_uploads(demo)
    state = {original._id: copy}
    asyncio.run(demo.preprocess_data(SimpleNamespace(inputs=[original]), [None], state))
    with pytest.raises(gr.Error, match="init image is too large: 20000x20000"):
        copy.preprocess(SimpleNamespace(path=str(bomb)))


# -- PNG Info ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pnginfo_refuses_a_huge_parameters_text_and_the_server_stays_responsive(client, web, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a castle " * 600_000 + "\nSteps: 20, Seed: 1")  # 5.4 MB
    Image.new("RGB", (16, 16)).save(tmp_path / "huge.png", pnginfo=info)

    def config_seconds() -> float:
        start = time.perf_counter()
        assert web.get("/config").status_code == 200
        return time.perf_counter() - start

    idle = min(config_seconds() for _ in range(5))
    result: dict[str, object] = {}
    job = threading.Thread(
        target=lambda: result.update(
            out=call(client, "pnginfo", **{"Drop an image": handle_file(str(tmp_path / "huge.png"))})
        )
    )
    job.start()
    during = [config_seconds()]
    while job.is_alive() or len(during) < 3:
        during.append(config_seconds())
    job.join()
    text, parsed, note = result["out"]
    assert (text, parsed) == ("", None)
    assert note == (
        "the parameters text has 5400019 characters; the limit is 262144 (--max-infotext-chars), "
        "so it is not read"
    )
    assert statistics.median(during) < 50 * idle, (idle, during)  # answered meanwhile, not after
    with pytest.raises(AppError, match=r"^the parameters text has 300000 characters; the limit is 262144"):
        call_named(client, "pnginfo_to_txt2img", "x" * 300_000)  # "Send to" checks too
    assert serving(web)


@pytest.mark.slow
def test_send_to_clamps_every_value_to_its_control(client, web):
    text = (
        "a castle\nNegative prompt: fog\nSteps: 99999999999999999999, Sampler: Euler a, CFG scale: 1e400, "
        "Seed: 99999999999, Size: 513x99999, Denoising strength: -2"
    )
    sent = call_named(client, "pnginfo_to_img2img", text)
    assert sent["Steps"] == 150 and sent["Seed (-1 = random)"] == 2**32 - 1
    assert (sent["Width"], sent["Height"]) == (512, 2048) and sent["Denoising strength"] == 0
    assert sent["CFG scale"] == {"__type__": "update"}  # not a number: left as it was
    assert sent["Prompt"] == "a castle" and sent["Sampler"] == "Euler a"
    notes = [value for value in sent.values() if isinstance(value, str) and "out of range" in value]
    assert notes == [
        "CFG scale '1e400' is not a number; not sent; Steps 99999999999999999999 is out of range; "
        "kept 150; Width 513 is not a multiple of 8; kept 512; Height 99999 is out of range; kept 2048; "
        "Seed 99999999999 is out of range; kept 4294967295; Denoising strength -2 is out of range; kept 0"
    ]
    assert serving(web)


def test_clamp_fields():
    limits = Limits()
    ranges = {
        "steps": Range("Steps", 1, limits.max_steps, 1),
        "width": Range("Width", 64, 2048, 8),
        "cfg_scale": Range("CFG scale", 1.0, 30.0, 0.5),
        "prompt": Range("Prompt", max_chars=5),
    }
    kept, notes = clamp_fields(
        {"steps": 0, "width": 67, "cfg_scale": 6.3, "prompt": "abcdefg", "model": "m"}, ranges
    )
    assert kept == {"steps": 1, "width": 64, "cfg_scale": 6.3, "prompt": "abcde", "model": "m"}
    assert notes == [
        "Steps 0 is out of range; kept 1",
        "Width 67 is not a multiple of 8; kept 64",
        "Prompt has 7 characters, over the limit of 5; kept the first 5",
    ]
    assert clamp_fields({"width": 2047, "cfg_scale": float("nan")}, ranges) == (
        {"width": 2048},
        ["Width 2047 is not a multiple of 8; kept 2048", "CFG scale nan is not a number; not sent"],
    )
    # exact integers (no float rounding of huge values), and nothing unreadable gets through
    values, notes = fields_from_infotext(
        FieldRegistry.builtin(),
        {"Steps": "99999999999999999999", "Seed": "inf", "CFG scale": "1e400", "Clip skip": "9" * 200},
    )
    assert values == {"steps": 99999999999999999999}
    assert notes == [
        "CFG scale '1e400' is not a number; not sent",
        "Seed 'inf' is not a number; not sent",
        "Clip skip '999999999999999999999999999999999999... is not a number; not sent",
    ]
