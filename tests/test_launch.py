"""Launch flags: safe by default, refusals with reasons, and logins that really guard the app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ui_server import Server, call

from webui.cli import build_parser
from webui.ui.server import LaunchRefused, exposure_problem, read_auth

ROOT = Path(__file__).resolve().parent.parent


def launch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--listen", "--share"])
def test_exposing_the_app_without_a_login_is_refused(flag):
    run = launch(flag, "--port", "1")
    assert run.returncode == 2
    message = run.stderr.strip()
    assert message.startswith(f"error: {flag} would let anyone")
    assert "--auth" in message and "--insecure" in message
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_a_malformed_login_is_refused(tmp_path):
    run = launch("--listen", "--auth", "nopassword")
    assert run.returncode == 2 and "USER:PASS" in run.stderr
    (tmp_path / "logins").write_text("# team\nalice:wonder\nbob\n")
    with pytest.raises(LaunchRefused, match=r"logins:3: .*USER:PASS"):
        read_auth(None, tmp_path / "logins")
    with pytest.raises(LaunchRefused, match="cannot read --auth-file"):
        read_auth(None, tmp_path / "missing")


def test_logins_from_flag_and_file(tmp_path):
    (tmp_path / "logins").write_text("# team\nalice:wonder\n\ncarol:pa:ss\n")
    assert read_auth("bob:builder", tmp_path / "logins") == [
        ("bob", "builder"),
        ("alice", "wonder"),
        ("carol", "pa:ss"),
    ]


def test_what_the_flags_allow():
    parse = build_parser().parse_args
    assert exposure_problem(parse([]), []) is None
    assert exposure_problem(parse(["--listen"]), [("a", "b")]) is None
    assert exposure_problem(parse(["--listen", "--share", "--insecure"]), []) is None
    assert "--share" in exposure_problem(parse(["--share"]), [])
    assert "--port" in exposure_problem(parse(["--port", "70000"]), [])
    args = parse([])
    assert (args.port, args.listen, args.share, args.auth) == (7860, False, False, None)


@pytest.mark.slow
def test_help_lists_the_launch_flags():
    run = launch("--help")
    assert run.returncode == 0
    for flag in (
        "--port",
        "--listen",
        "--share",
        "--auth",
        "--auth-file",
        "--insecure",
        "--model",
        "--models-dir",
        "--outputs-dir",
        "--device",
        "--dtype",
        "--queue-size",
    ):
        assert flag in run.stdout, flag


@pytest.mark.slow
def test_default_bind_is_localhost_and_a_login_guards_the_app(tmp_path):
    server = Server(tmp_path / "outputs", "--auth", "alice:wonder")
    try:
        assert server.demo.server_name == "127.0.0.1"
        with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):
            server.client()
        client = server.client(auth=("alice", "wonder"))
        assert call(client, "txt2img", Prompt="a red circle", Steps=2)[0].startswith("1 image(s)")
    finally:
        server.close()


def test_ui_modules_never_touch_torch():
    for path in (ROOT / "webui" / "ui").rglob("*.py"):
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", '"'))]
        assert not any("import torch" in line or "torch." in line for line in code), path


@pytest.mark.slow
def test_python_launch_py_serves_on_localhost(tmp_path):
    import httpx
    from ui_server import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--outputs-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = ""
        for _ in range(200):
            line = process.stdout.readline()
            if "running at" in line or not line:
                break
        assert line.strip() == f"Latent Studio is running at http://127.0.0.1:{port}/", line
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "Latent Studio" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)
