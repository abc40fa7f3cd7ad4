"""The HTTP API's launch flags and who may call it.

``--api`` serves the API beside the web app, ``--nowebui`` alone. ``--api-auth USER:PASS[,...]``
and ``--api-auth-file`` give its HTTP Basic logins (as AUTOMATIC1111 does); without them the web
app's ``--auth`` logins are used. ``--api-key``/``--api-key-file`` give bearer tokens (OpenAI's
clients send one), accepted on every API route. The rules of ``--listen`` and ``--share`` hold:
an API that other machines can reach needs a login or a key, unless ``--insecure``.

A caller is known by an owner name: the login's user name, ``key-<n>`` for the n-th API key, or
``""`` when the API has no login at all (a server on 127.0.0.1 for its owner alone).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from webui.limits import at_least

__all__ = ["ApiAccess", "ApiSettings", "add_api_options", "api_settings"]

KEY_HEADER_PREFIX = "bearer "


def add_api_options(parser: argparse.ArgumentParser) -> None:
    """The HTTP API's flags (``launch.py --help`` shows them in their own group)."""
    group = parser.add_argument_group("HTTP API (AUTOMATIC1111's /sdapi/v1, jobs, OpenAI images)")
    group.add_argument("--api", action="store_true", help="also serve the HTTP API on the web app's port")
    group.add_argument("--nowebui", action="store_true", help="serve the HTTP API alone, without the web app")
    group.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASS[,USER:PASS...]",
        help="HTTP Basic logins for the API (default: the web app's --auth logins)",
    )
    group.add_argument(
        "--api-auth-file",
        type=Path,
        default=None,
        help="file with one USER:PASS per line for the API (# starts a comment)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        metavar="KEY[,KEY...]",
        help="bearer tokens the API accepts (Authorization: Bearer KEY), as OpenAI's clients send",
    )
    group.add_argument("--api-key-file", type=Path, default=None, help="file with one API key per line")
    group.add_argument(
        "--job-keep-seconds",
        type=_positive,
        default=3600.0,
        metavar="SECONDS",
        help="how long a finished job (and its images, when not saved) is kept for its owner (default 3600)",
    )
    group.add_argument(
        "--job-keep-count",
        type=at_least(1),
        default=100,
        metavar="N",
        help="at most this many finished jobs are kept; the oldest go first (default 100)",
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class ApiSettings:
    """What the flags decided: whether to serve the API (and the web app), and who may call it."""

    enabled: bool
    web: bool
    logins: tuple[tuple[str, str], ...] = ()
    keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def protected(self) -> bool:
        return bool(self.logins or self.keys)

    def login_stand_ins(self) -> list[tuple[str, str]]:
        """For the launch checks of ``--nowebui``: the API's logins, or one entry standing for its
        keys, so "listening needs a login" is judged by the API's own protection."""
        return list(self.logins) or ([("(api key)", "")] if self.keys else [])


def api_settings(args: argparse.Namespace, web_logins: list[tuple[str, str]]) -> ApiSettings:
    """The API's settings from the flags, checked; raises ``LaunchRefused`` (one line) for an
    unsafe or malformed combination."""
    from webui.ui.server import LaunchRefused, read_auth

    nowebui = bool(getattr(args, "nowebui", False))
    enabled = nowebui or bool(getattr(args, "api", False))
    api_auth, api_auth_file = getattr(args, "api_auth", None), getattr(args, "api_auth_file", None)
    logins = (
        read_auth(api_auth, api_auth_file)
        if (api_auth is not None or api_auth_file is not None)
        else list(web_logins)
    )
    keys = _read_keys(getattr(args, "api_key", None), getattr(args, "api_key_file", None))
    settings = ApiSettings(enabled=enabled, web=not nowebui, logins=tuple(logins), keys=tuple(keys))
    if not enabled:
        if api_auth is not None or api_auth_file is not None or keys:
            raise LaunchRefused("--api-auth, --api-auth-file and --api-key need --api or --nowebui")
        return settings
    if nowebui and args.share:
        raise LaunchRefused("--share opens a link to the web app; it cannot be used with --nowebui")
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not settings.protected and not args.insecure:
        raise LaunchRefused(
            f"{' and '.join(exposed)} would let anyone who can reach this machine use the HTTP API. "
            "Add a login with --api-auth USER:PASS (or --auth), or a key with --api-key, "
            "or pass --insecure to start without one anyway."
        )
    return settings


def _read_keys(keys: str | None, key_file: Path | None) -> list[str]:
    from webui.ui.server import LaunchRefused

    found = [key.strip() for key in (keys or "").split(",") if key.strip()]
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise LaunchRefused(
                f"cannot read --api-key-file {key_file}: "
                f"{getattr(error, 'strerror', None) or type(error).__name__}"
            ) from None
        found += [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    for key in found:
        if len(key) < 8 or any(ch.isspace() or not ch.isprintable() for ch in key):
            raise LaunchRefused("an API key must be at least 8 printable characters without spaces")
    if (keys is not None or key_file is not None) and not found:
        raise LaunchRefused("--api-key / --api-key-file gave no key")
    return found


class ApiAccess:
    """Checks a request's ``Authorization`` header against the settings' logins and keys."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings

    @property
    def open(self) -> bool:
        return not self.settings.protected

    def owner(self, authorization: str | None) -> str | None:
        """The caller's owner name, or None when the header gives no valid login or key (an API
        without logins or keys lets everyone in as ``""``). Compared in constant time."""
        if self.open:
            return ""
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            found = None
            for number, key in enumerate(self.settings.keys, 1):
                if hmac.compare_digest(value.encode(), key.encode()):
                    found = f"key-{number}"
            return found
        if scheme == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            if not sep:
                return None
            found = None
            for known_user, known_password in self.settings.logins:
                same_user = hmac.compare_digest(user.encode(), known_user.encode())
                same_password = hmac.compare_digest(password.encode(), known_password.encode())
                if same_user and same_password:
                    found = known_user
            return found
        return None

    def user_of(self, authorization: str | None) -> str:
        """The user name a header claims (for the log of a failed login; never the password)."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return "(a key)" if scheme.lower() == "bearer" else ""
        try:
            return (
                base64.b64decode(value.strip(), validate=True)
                .decode("utf-8", "replace")
                .partition(":")[0][:100]
            )
        except (binascii.Error, ValueError):
            return ""
