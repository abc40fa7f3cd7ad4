"""Starting the web app: the launch flags' checks (logins, exposure) and the gradio server, and
restarting it in place (the Plugins tab's "Apply and restart")."""

from __future__ import annotations

import argparse
import codecs
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from webui.errors import InvalidRequestError

__all__ = [
    "LaunchRefused",
    "PluginControl",
    "add_server_options",
    "exposure_problem",
    "outputs_problem",
    "parse_origins",
    "plugin_control_problem",
    "read_auth",
    "restart_in_place",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860
LOCALHOST = "127.0.0.1"
EVERYWHERE = "0.0.0.0"  # noqa: S104 - only with --listen, which needs a login or --insecure


class LaunchRefused(InvalidRequestError):
    """The flags ask for something unsafe (or contradictory); the message says what and why."""


def add_server_options(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("web app (when no command is given)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on (default 7860)")
    server.add_argument(
        "--listen",
        action="store_true",
        help="listen on all network interfaces (0.0.0.0) instead of 127.0.0.1; needs a login",
    )
    server.add_argument(
        "--share", action="store_true", help="also open a public gradio share link; needs a login"
    )
    server.add_argument(
        "--auth", default=None, metavar="USER:PASS[,USER:PASS...]", help="logins for the web app"
    )
    server.add_argument(
        "--auth-file", type=Path, default=None, help="file with one USER:PASS per line (# starts a comment)"
    )
    server.add_argument(
        "--insecure",
        action="store_true",
        help="allow --listen or --share without a login (anyone who can reach the port can use it)",
    )
    server.add_argument(
        "--outputs-dir", type=Path, default=None, help="where images are saved (default: outputs/)"
    )
    server.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="generations that may wait; more get a 'busy, try again' message (default 16)",
    )
    server.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload in MB (default 50)")
    server.add_argument("--preview-every", type=int, default=5, help="live preview every N steps; 0 = off")
    server.add_argument(
        "--cors-allow-origins",
        default=None,
        metavar="ORIGIN[,ORIGIN...]",
        help="other sites whose pages may call this server from the browser, e.g. "
        "https://example.com (default: only the server's own address; * = any site)",
    )
    server.add_argument(
        "--enable-plugin-install",
        action="store_true",
        help="let the web app install plugins, turn them on or off and restart the server even "
        "with --listen or --share (needs a login): whoever logs in can then run code on this "
        "machine. Without it, only a server on 127.0.0.1 without --share may",
    )
    from webui.plugin_admin import add_plugin_options

    add_plugin_options(parser)
    from webui.http.auth import add_api_options

    add_api_options(parser)


def read_auth(auth: str | None, auth_file: Path | None) -> list[tuple[str, str]]:
    """Logins from ``--auth`` and ``--auth-file``; malformed entries are refused, never skipped.

    Spaces around the user name and the password are dropped (``" USER : PASS "``). The file may be
    UTF-8 (with or without a byte order mark) or UTF-16 with a byte order mark. No message repeats
    an entry: it could hold a password.
    """
    entries: list[tuple[str, str]] = []
    sources: list[tuple[str, str]] = []
    if auth:
        sources += [(f"--auth login {n}", part) for n, part in enumerate(auth.split(","), 1) if part.strip()]
    if auth_file is not None:
        lines = _auth_file_text(auth_file).splitlines()
        sources += [
            (f"{auth_file}:{n}", line)
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    for where, item in sources:
        user, sep, password = item.partition(":")
        user, password = user.strip(), password.strip()
        if not sep or not user or not password:
            raise LaunchRefused(f"{where}: a login must look like USER:PASS, with a user name and a password")
        entries.append((user, password))
    if (auth is not None or auth_file is not None) and not entries:
        raise LaunchRefused("--auth / --auth-file gave no login")
    return entries


def _auth_file_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LaunchRefused(f"cannot read --auth-file {path}: {error.strerror or error}") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif raw.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise LaunchRefused(f"--auth-file {path} is not UTF-8 or UTF-16 text; save it as UTF-8") from None
    if "\x00" in text:
        raise LaunchRefused(
            f"--auth-file {path} looks like UTF-16 without a byte order mark; save it as UTF-8"
        )
    return text


def exposure_problem(args: argparse.Namespace, logins: list[tuple[str, str]]) -> str | None:
    """Why these flags must not start a server, or ``None`` when they may (one line)."""
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not logins and not args.insecure:
        return (
            f"{' and '.join(exposed)} would let anyone who can reach this machine"
            f"{' (or the share link)' if args.share else ''} use it and read its outputs. "
            "Add a login with --auth USER:PASS or --auth-file FILE, "
            "or pass --insecure to start without one anyway."
        )
    if exposed and not logins and getattr(args, "enable_plugin_install", False):
        return (
            f"--enable-plugin-install with {' and '.join(exposed)} would let anyone who can reach this machine "
            "install code that runs on it; it needs a login (--auth or --auth-file), even with --insecure"
        )
    if not 0 < args.port < 65536:
        return f"--port must be between 1 and 65535, got {args.port}"
    if args.queue_size < 1:
        return f"--queue-size must be at least 1, got {args.queue_size}"
    max_upload = getattr(args, "max_upload_mb", 50.0)
    if not (math.isfinite(max_upload) and max_upload > 0):
        return f"--max-upload-mb must be a number of megabytes above 0, got {max_upload:g}"
    preview_every = getattr(args, "preview_every", 0)
    if preview_every < 0:
        return f"--preview-every must be 0 (off) or more, got {preview_every}"
    try:
        parse_origins(getattr(args, "cors_allow_origins", None))
    except ValueError as error:
        return str(error)
    return None


def parse_origins(text: str | None) -> tuple[str, ...]:
    """``--cors-allow-origins``: comma-separated origins such as ``https://example.com:8443``, or
    ``*`` for any origin. Raises :class:`ValueError` with a one-line message for anything else."""
    origins: list[str] = []
    for item in (text or "").split(","):
        item = item.strip().rstrip("/").lower()
        if not item:
            continue
        if item != "*":
            try:
                parts = urlsplit(item)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
            except ValueError:  # a bad port or bracket
                valid = False
            if not valid or parts.path or parts.query or parts.fragment:
                raise ValueError(f"--cors-allow-origins: {item!r} is not an origin like https://example.com")
        origins.append(item)
    return tuple(origins)


def outputs_problem(outputs: Path) -> str | None:
    """Why images cannot be saved under ``outputs``, or ``None`` (the folder is created if missing)."""
    from webui.output import check_writable

    problem = check_writable(outputs)
    if problem is None:
        try:
            outputs.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = f"{outputs} is not a writable folder ({error.strerror or type(error).__name__})"
    return None if problem is None else f"the outputs folder {problem}"


@dataclass(frozen=True)
class PluginControl:
    """What the web app's Plugins tab may change: with ``problem`` None it may install plugins,
    turn them on or off and (with ``restart``) restart the server; otherwise ``problem`` says why
    not, and the tab shows its controls disabled with that reason and connects no handler to them."""

    problem: str | None
    restart: Callable[[], None] | None = None

    @property
    def allowed(self) -> bool:
        return self.problem is None


def install_server_guards(app: Any, args: argparse.Namespace, *, throttle: Any = None) -> None:
    """The request guards from the server's flags (the web app's and the API-alone server's):
    the body limit of ``--max-upload-mb``, ``--cors-allow-origins``, and the login ``throttle``."""
    from webui.ui.security import body_limit_bytes, install_guards

    max_body = body_limit_bytes(args.max_upload_mb)
    install_guards(
        app,
        max_body=max_body,
        cors_origins=parse_origins(getattr(args, "cors_allow_origins", None)),
        body_message=(
            f"the request body is over {max_body / 2**20:.1f} MB, the most this server accepts "
            f"(set by --max-upload-mb {args.max_upload_mb:g})"
        ),
        throttle=throttle,
    )


def plugin_control_problem(args: argparse.Namespace) -> str | None:
    """Why the web app must not install plugins, turn them on or off or restart itself, or None when
    it may: only a server that listens on 127.0.0.1 without --share may, unless
    ``--enable-plugin-install`` is given (which needs a login then, see :func:`exposure_problem`).
    Whoever can do these things can run code on the machine."""
    if getattr(args, "enable_plugin_install", False):
        return None
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed:
        return (
            f"Installing plugins, turning them on or off and restarting are off here: this server was started "
            f"with {' and '.join(exposed)}, so other people can reach it, and a plugin runs with the app's "
            "rights. Use `python launch.py plugins` on the server's machine, or start the server with "
            "--enable-plugin-install."
        )
    return None


def restart_in_place(delay: float = 1.0) -> None:
    """Restart this process ``delay`` seconds from now (so the answer that says so reaches the
    browser first): ``os.execv`` the same Python with the same command line, keeping the process id
    and the environment (``--safe-mode`` and ``--plugins`` travel in it too). The new program
    reads the plugins and settings again and serves on the same port with the same flags."""
    argv = [sys.executable, *sys.orig_argv[1:]]

    def restart() -> None:
        time.sleep(delay)
        log.warning("restarting: %s", " ".join(argv))
        print("Restarting Latent Studio...", flush=True)
        sys.stderr.flush()
        os.execv(sys.executable, argv)

    threading.Thread(target=restart, name="latent-studio-restart", daemon=True).start()


def serve(
    args: argparse.Namespace, engine: Any, *, block: bool = True, restart: Callable[[], None] | None = None
) -> Any:
    """Check the flags, build the app over ``engine`` and start it. Returns the gradio app
    (still serving when ``block`` is false, as the tests use it).

    ``restart`` is what the Plugins tab's "Apply and restart" calls: by default
    :func:`restart_in_place` for a blocking server (``launch.py``), and nothing for one that runs
    inside another program (``block=False``), which must not be replaced by a new process."""
    from PIL import Image

    from webui.images import MAX_PIXELS
    from webui.ui.app import CSS, build_app, configure_queue
    from webui.ui.security import LoginThrottle, guard_uploads
    from webui.ui.service import StudioService

    logins = read_auth(args.auth, args.auth_file)
    from webui.http.auth import api_settings

    api = api_settings(args, logins)  # --api / --nowebui, their logins and keys, checked
    problem = exposure_problem(args, logins if api.web else api.login_stand_ins())
    if problem:
        raise LaunchRefused(problem)
    # Pillow refuses decompression bombs at open; uploads are checked from their headers before that
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    from webui.paths import outputs_dir

    outputs = Path(args.outputs_dir) if args.outputs_dir else outputs_dir()
    unwritable = outputs_problem(outputs)
    if unwritable:  # still serve: the owner may fix the folder while the app runs
        log.warning("%s: generated images cannot be saved", unwritable)
        print(f"warning: {unwritable}: generated images cannot be saved until it is fixed", flush=True)
    # model names from browsers and the API stay inside the model folders (--model may still be a path)
    engine.models.allow_paths = False
    service = StudioService(engine, outputs, preview_every=args.preview_every)
    # read by the Plugins tab: whether it may install, enable or disable plugins and restart
    service.plugin_control = PluginControl(
        plugin_control_problem(args), restart if restart is not None else restart_in_place if block else None
    )
    if not api.web:  # --nowebui: the HTTP API alone
        from webui.http.routes import serve_api_alone

        return serve_api_alone(args, service, api, block=block)
    demo = configure_queue(build_app(service), args.queue_size)
    guard_uploads(demo)
    demo.studio_service = service  # for whoever holds the app (the tests) to see the sessions
    app, local_url, share_url = demo.launch(
        server_name=EVERYWHERE if args.listen else LOCALHOST,
        server_port=args.port,
        share=bool(args.share),
        auth=logins or None,
        max_file_size=int(args.max_upload_mb * 1024 * 1024),
        allowed_paths=[str(outputs.resolve())],
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        css=CSS,
        footer_links=["api", "settings"],
    )
    install_server_guards(app, args, throttle=LoginThrottle() if logins else None)
    from webui.http.routes import mount_api

    mount_api(app, demo, service, api, args)  # --api: on the same port, behind the same guards
    if block:
        print(
            f"Latent Studio is running at {local_url}" + (f" and {share_url}" if share_url else ""),
            flush=True,
        )
        print(f"Images are saved under {outputs}. Press Ctrl+C to stop.", flush=True)
        demo.block_thread()
    return demo
