"""Starting the web app: the launch flags' checks (logins, exposure) and the gradio server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from webui.errors import InvalidRequestError

__all__ = ["LaunchRefused", "add_server_options", "exposure_problem", "read_auth", "serve"]

DEFAULT_PORT = 7860
LOCALHOST = "127.0.0.1"
EVERYWHERE = "0.0.0.0"  # noqa: S104 - only with --listen, which needs a login or --insecure


class LaunchRefused(InvalidRequestError):
    """The flags ask for something unsafe (or contradictory); the message says what and why."""


def add_server_options(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("web app (when no command is given)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on (default 7860)")
    server.add_argument("--listen", action="store_true",
                        help="listen on all network interfaces (0.0.0.0) instead of 127.0.0.1; needs a login")
    server.add_argument("--share", action="store_true", help="also open a public gradio share link; needs a login")
    server.add_argument("--auth", default=None, metavar="USER:PASS[,USER:PASS...]", help="logins for the web app")
    server.add_argument("--auth-file", type=Path, default=None,
                        help="file with one USER:PASS per line (# starts a comment)")
    server.add_argument("--insecure", action="store_true",
                        help="allow --listen or --share without a login (anyone who can reach the port can use it)")
    server.add_argument("--outputs-dir", type=Path, default=None, help="where images are saved (default: outputs/)")
    server.add_argument("--queue-size", type=int, default=16,
                        help="generations that may wait; more get a 'busy, try again' message (default 16)")
    server.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload in MB (default 50)")
    server.add_argument("--preview-every", type=int, default=5, help="live preview every N steps; 0 = off")


def read_auth(auth: str | None, auth_file: Path | None) -> list[tuple[str, str]]:
    """Logins from ``--auth`` and ``--auth-file``; malformed entries are refused, never skipped."""
    entries: list[tuple[str, str]] = []
    sources: list[tuple[str, str]] = []
    if auth:
        sources += [("--auth", part) for part in auth.split(",")]
    if auth_file is not None:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise LaunchRefused(f"cannot read --auth-file {auth_file}: {error.strerror or error}") from None
        sources += [(f"{auth_file}:{n}", line) for n, line in enumerate(lines, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    for where, item in sources:
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise LaunchRefused(f"{where}: a login must look like USER:PASS, got {item.strip()!r}")
        entries.append((user, password))
    if (auth is not None or auth_file is not None) and not entries:
        raise LaunchRefused("--auth / --auth-file gave no login")
    return entries


def exposure_problem(args: argparse.Namespace, logins: list[tuple[str, str]]) -> str | None:
    """Why these flags must not start a server, or ``None`` when they may."""
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not logins and not args.insecure:
        return (f"{' and '.join(exposed)} would let anyone who can reach this machine"
                f"{' (or the share link)' if args.share else ''} use it and read its outputs. "
                "Add a login with --auth USER:PASS or --auth-file FILE, "
                "or pass --insecure to start without one anyway.")
    if not 0 < args.port < 65536:
        return f"--port must be between 1 and 65535, got {args.port}"
    if args.queue_size < 1:
        return f"--queue-size must be at least 1, got {args.queue_size}"
    return None


def serve(args: argparse.Namespace, engine: Any, *, block: bool = True) -> Any:
    """Check the flags, build the app over ``engine`` and start it. Returns the gradio app
    (still serving when ``block`` is false, as the tests use it)."""
    from PIL import Image

    from webui.images import MAX_PIXELS
    from webui.ui.app import CSS, build_app, configure_queue
    from webui.ui.service import StudioService

    logins = read_auth(args.auth, args.auth_file)
    problem = exposure_problem(args, logins)
    if problem:
        raise LaunchRefused(problem)
    # Pillow refuses decompression bombs at open; the engine's own check gives the message below that
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    from webui.cli import DEFAULT_OUTPUTS_DIR

    outputs = Path(args.outputs_dir) if args.outputs_dir else DEFAULT_OUTPUTS_DIR
    # model names from browsers and the API stay inside the model folders (--model may still be a path)
    engine.models.allow_paths = False
    service = StudioService(engine, outputs, preview_every=args.preview_every)
    demo = configure_queue(build_app(service), args.queue_size)
    demo.studio_service = service  # for whoever holds the app (the tests) to see the sessions
    _, local_url, share_url = demo.launch(
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
    if block:
        print(f"Latent Studio is running at {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
        print(f"Images are saved under {outputs}. Press Ctrl+C to stop.", flush=True)
        demo.block_thread()
    return demo
