"""What stands between the network and the web app: request size, CORS, login throttling, uploads.

:func:`install_guards` puts three ASGI layers in front of gradio's app, outermost first:

* :class:`OriginPolicy` answers CORS: only the server's own origin (and those given with
  ``--cors-allow-origins``) get ``Access-Control-Allow-*`` headers; every other origin gets none,
  whatever an inner layer would have said;
* :class:`BodyLimit` refuses a request body over the limit on every route (413, one line), by its
  ``Content-Length`` or, for a chunked body, as soon as the bytes received pass the limit;
* :class:`LoginGuard` slows failed logins per client address (:class:`LoginThrottle`) and logs
  each failure (user name and address, never the password).

Uploaded images are checked by :func:`guard_image_input` before gradio decodes them, and opened by
:func:`open_upload` in the tabs: every problem is a one-line message without a server path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gradio as gr
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webui.errors import InvalidRequestError

__all__ = [
    "BodyLimit",
    "LoginGuard",
    "LoginThrottle",
    "OriginPolicy",
    "body_limit_bytes",
    "guard_image_input",
    "guard_uploads",
    "install_guards",
    "open_upload",
    "same_origin",
]

log = logging.getLogger(__name__)

# -- sending a short answer ------------------------------------------------------------------------


async def _answer(send: Send, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    """A one-line JSON answer (``{"detail": ...}``, FastAPI's error shape) that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# -- CORS ----------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ALLOW_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an ``Origin`` header; None when it is not an http(s) origin (``null``...)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname.lower(), port


def same_origin(origin: str, host: str | None, scheme: str = "http") -> bool:
    """Whether ``origin`` is the address the request was sent to: the same scheme, and the host
    name and port of its ``Host`` header (without a port: the scheme's default)."""
    key = _origin_key(origin)
    if key is None or not host or scheme not in _DEFAULT_PORTS:
        return False
    try:
        parts = urlsplit("//" + host.strip())
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return False
    return bool(parts.hostname) and key == (scheme, str(parts.hostname).lower(), port)


class OriginPolicy:
    """CORS for the whole app: the server's own origin, plus ``allowed`` (``*`` = any origin).

    A request from any other origin gets no ``Access-Control-Allow-*`` header (an inner layer's
    are removed), so a page on another site cannot read the answers with the user's cookies; its
    preflight is answered 400 with a one-line reason.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(origin.strip().rstrip("/").lower() for origin in allowed)

    def allows(self, origin: str, host: str | None, scheme: str = "http") -> bool:
        listed = "*" in self.allowed or origin.strip().rstrip("/").lower() in self.allowed
        return listed or same_origin(origin, host, scheme)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self.allows(origin, headers.get("host"), scope.get("scheme", "http"))
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin, allowed, headers.get("access-control-request-headers"))
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                response = MutableHeaders(scope=message)
                for name in {key for key in response.keys() if key.startswith("access-control-")}:
                    del response[name]
                if allowed:
                    response["Access-Control-Allow-Origin"] = origin
                    response["Access-Control-Allow-Credentials"] = "true"
                    response.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_policy)

    @staticmethod
    async def _preflight(send: Send, origin: str, allowed: bool, requested: str | None) -> None:
        if not allowed:
            await _answer(
                send,
                400,
                "cross-origin requests from this origin are not allowed "
                "(the server owner can list it with --cors-allow-origins)",
            )
            return
        headers = [
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", _ALLOW_METHODS),
            ("access-control-max-age", "600"),
            ("vary", "Origin"),
        ]
        if requested:
            headers.append(("access-control-allow-headers", requested))
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*raw, (b"content-length", b"2"), (b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"OK"})


# -- request body size ---------------------------------------------------------------------------


def body_limit_bytes(max_upload_mb: float) -> int:
    """The largest request body: an upload of ``--max-upload-mb`` sent inline as base64 (4/3 of
    its size) with 1 MiB for the rest of the request."""
    return int(max_upload_mb * 1024 * 1024 * 4 / 3) + 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` on every route with 413 and ``message``.

    A ``Content-Length`` over the limit is refused before anything is read; a chunked body is
    counted as it arrives and refused as soon as it passes the limit (what the app would have
    answered to the cut-off body is dropped), so no body larger than the limit is ever buffered.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, message: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await _answer(send, 413, self.message)
            return
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the app's own answer to a body it could not finish reading
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await _answer(send, 413, self.message)


# -- logins --------------------------------------------------------------------------------------


@dataclass
class _Attempts:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Failed logins per client address: ``free`` attempts, then a wait that doubles with each
    further failure (``delay``, ``2 * delay``... up to ``max_delay`` seconds). A success resets the
    address; an address left alone for ``forget_after`` seconds starts afresh. Each address is
    counted on its own, and at most ``max_addresses`` are remembered (the oldest go first).

    An attempt is counted when it starts (:meth:`begin`) and forgiven when it succeeds
    (:meth:`succeeded`), so parallel attempts cannot slip past the count.
    """

    def __init__(
        self,
        *,
        free: int = 5,
        delay: float = 2.0,
        max_delay: float = 60.0,
        forget_after: float = 900.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = max(1, free)
        self.delay = delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_addresses = max_addresses
        self.clock = clock
        self._attempts: OrderedDict[str, _Attempts] = OrderedDict()
        self._lock = threading.Lock()

    def begin(self, address: str) -> float:
        """Seconds ``address`` must still wait (the attempt is refused), or 0 (it is counted)."""
        now = self.clock()
        with self._lock:
            attempts = self._attempts.get(address)
            if attempts is not None and now - attempts.last > self.forget_after:
                attempts = None
            if attempts is not None and attempts.blocked_until > now:
                return attempts.blocked_until - now
            attempts = attempts or _Attempts()
            attempts.count += 1
            attempts.last = now
            if attempts.count >= self.free:
                doublings = min(attempts.count - self.free, 32)
                attempts.blocked_until = now + min(self.max_delay, self.delay * 2**doublings)
            self._attempts[address] = attempts
            self._attempts.move_to_end(address)
            while len(self._attempts) > self.max_addresses:
                self._attempts.popitem(last=False)
        return 0.0

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._attempts.pop(address, None)

    @staticmethod
    def message(wait: float) -> str:
        return f"too many failed logins, try again in {max(1, math.ceil(wait))} s"


def client_address(scope: Scope) -> str:
    """The client's address (a trusted reverse proxy's ``X-Forwarded-For`` is already applied by
    the server for connections from it)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class LoginGuard:
    """Throttle and log ``POST /login`` (gradio's login form) with ``throttle``."""

    def __init__(
        self, app: ASGIApp, throttle: LoginThrottle, paths: Iterable[str] = ("/login", "/login/")
    ) -> None:
        self.app = app
        self.throttle = throttle
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        address = client_address(scope)
        wait = self.throttle.begin(address)
        if wait > 0:
            log.debug("login from %s refused: waiting %.0f s after failed logins", address, wait)
            await _answer(
                send, 429, LoginThrottle.message(wait), [("retry-after", str(max(1, math.ceil(wait))))]
            )
            return
        body = bytearray()  # the form is small, and BodyLimit bounds it anyway
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            if status == 200:
                self.throttle.succeeded(address)
            else:
                user = _form_user(bytes(body), Headers(scope=scope).get("content-type", ""))
                log.warning("failed login for user %r from %s", user, address)


def _form_user(body: bytes, content_type: str) -> str:
    """The ``username`` field of a login form (urlencoded, or multipart as the login page sends it)."""
    if len(body) > 65536:
        return ""
    try:
        if content_type.lower().startswith("multipart/"):
            form = BytesParser().parsebytes(
                b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
            )
            for part in form.walk():
                if part.get_param("name", header="content-disposition") == "username":
                    payload = part.get_payload(decode=True)
                    return (
                        payload.decode("utf-8", errors="replace").strip()[:100]
                        if isinstance(payload, bytes)
                        else ""
                    )
            return ""
        values = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=20)
    except (ValueError, UnicodeEncodeError):
        return ""
    return (values.get("username") or [""])[0].strip()[:100]


# -- installing ----------------------------------------------------------------------------------


def install_guards(
    app: Any,
    *,
    max_body: int,
    body_message: str,
    cors_origins: Iterable[str] = (),
    throttle: LoginThrottle | None = None,
) -> None:
    """Put the guards in front of a running Starlette/FastAPI ``app`` (gradio's ``demo.app``).

    They go outermost, before gradio's own layers (its CORS layer reflects any origin for a server
    that is not on localhost), and the middleware stack is rebuilt in one assignment, so requests
    already under way finish as they started and every new one passes the guards.
    """
    layers = [
        Middleware(OriginPolicy, allowed=tuple(cors_origins)),
        Middleware(BodyLimit, max_bytes=max_body, message=body_message),
    ]
    if throttle is not None:
        layers.append(Middleware(LoginGuard, throttle=throttle))
    app.user_middleware[0:0] = layers
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = app.build_middleware_stack()


# -- uploads -------------------------------------------------------------------------------------


def _max_pixels() -> int:
    from webui.images import MAX_PIXELS

    return MAX_PIXELS


def _header_size(path: str) -> tuple[int, int]:
    """Width and height from an image file's header, without decoding pixels and without Pillow's
    decompression-bomb refusal (which names no size): each registered format is tried in turn,
    as ``Image.open`` does."""
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for format_id in list(Image.ID):
            factory, accept = Image.OPEN[format_id]
            result = accept(prefix) if accept else True
            if not result or isinstance(result, str):
                continue
            fp.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = factory(fp, path)
            except (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, struct.error):
                continue
            return image.size
    raise UnidentifiedImageError("not an image")


def check_upload_file(path: str, subject: str) -> tuple[int, int]:
    """The size of the uploaded image at ``path``, read from its header and checked: an empty file,
    a non-image and an image over the pixel limit raise :class:`InvalidRequestError` with a
    one-line message that names ``subject``, never the path."""
    from webui.images import check_pixels

    try:
        if os.path.getsize(path) == 0:
            raise InvalidRequestError(f"{subject} is an empty file")
        width, height = _header_size(path)
    except (OSError, UnidentifiedImageError):
        raise InvalidRequestError(f"{subject} is not a readable image") from None
    check_pixels(width, height, subject)
    return width, height


def open_upload(path: str, subject: str) -> Image.Image:
    """The uploaded image at ``path``, checked (:func:`check_upload_file`) and fully decoded, so a
    truncated or damaged file is refused here with a one-line message, never with its path."""
    check_upload_file(path, subject)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except Image.DecompressionBombError:
        raise InvalidRequestError(f"{subject} is too large (more than {_max_pixels()} pixels)") from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError):
        raise InvalidRequestError(
            f"{subject} is not a readable image (the file is truncated or damaged)"
        ) from None
    return image


def _payload_paths(payload: Any) -> Iterator[str]:
    """The file paths in an image component's payload (gradio's FileData models, nested)."""
    if payload is None:
        return
    path = getattr(payload, "path", None)
    if isinstance(path, str):
        yield path
        return
    if isinstance(payload, dict):
        values: Iterable[Any] = payload.values()
    elif isinstance(payload, (list, tuple)):
        values = payload
    elif hasattr(payload, "__dict__"):
        values = vars(payload).values()
    else:
        return
    for value in values:
        yield from _payload_paths(value)


def guard_image_input(component: Any, subject: str) -> Any:
    """Make ``component`` (a ``gr.Image`` or ``gr.ImageEditor``) refuse bad uploads with one line
    naming ``subject``: each file is checked from its header before gradio decodes it, and any
    error while gradio prepares the value becomes "<subject> is not a readable image". Returns the
    component. (Installed on the instance; :func:`guard_uploads` re-installs it on the copies gradio
    makes of a component for a session.)"""
    if getattr(component, "_upload_subject", None) == subject and "preprocess" in vars(component):
        return component
    original = type(component).preprocess

    def preprocess(payload: Any) -> Any:
        for path in _payload_paths(payload):
            try:
                check_upload_file(path, subject)
            except InvalidRequestError as error:
                raise gr.Error(str(error), print_exception=False) from None
        try:
            return original(component, payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError:
            raise gr.Error(
                f"{subject} is too large (more than {_max_pixels()} pixels)", print_exception=False
            ) from None
        except Exception as error:
            log.info("unreadable %s upload: %s: %s", subject, type(error).__name__, error)
            raise gr.Error(f"{subject} is not a readable image", print_exception=False) from None

    component.preprocess = preprocess
    component._upload_subject = subject
    return component


def guard_uploads(demo: Any) -> None:
    """Keep :func:`guard_image_input` on the per-session copies of guarded components: gradio
    rebuilds a component for a session when an event updates its properties (a new brush...),
    and the copy would otherwise prepare uploads unguarded."""
    original = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            for block in getattr(block_fn, "inputs", ()):
                subject = getattr(block, "_upload_subject", None)
                if subject and state is not None and block._id in state:
                    copy = state[block._id]
                    if copy is not block:
                        guard_image_input(copy, subject)
        except (
            Exception
        ):  # pragma: no cover - gradio's session state changed shape: the originals stay guarded
            log.debug("cannot guard the session copies of upload components", exc_info=True)
        return await original(block_fn, inputs, state, *args, **kwargs)

    demo.preprocess_data = preprocess_data
