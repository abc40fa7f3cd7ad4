"""How much work one request may ask for: the limits a server owner sets, with safe defaults.

Every request (web app, HTTP API, command line, Python) is checked against the engine's
:class:`Limits` before anything is computed, and a request over a limit gets a one-line message
that names the limit and the flag that raises it, e.g.::

    the prompt has 12000 characters, over this server's limit of 10000 (--max-prompt-chars)

The web app shows the limits as its controls' ranges, so a browser user rarely meets the message.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webui.errors import InvalidRequestError

__all__ = ["LIMIT_FLAGS", "Limits", "LimitExceeded", "add_limit_options", "check_total"]


class LimitExceeded(InvalidRequestError):
    """A request asks for more than the server allows; the message names the limit and its flag."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one request. ``0`` in a field means "no limit" (for trusted local use)."""

    max_prompt_chars: int = 10_000
    """Characters of the prompt, and of the negative prompt, each."""
    max_prompt_chunks: int = 32
    """75-token chunks of the text encoder per prompt (32 chunks = 2,400 tokens)."""
    max_steps: int = 150
    """Sampling steps per image."""
    max_pixels: int = 2048 * 2048
    """Width × height of one generated image."""
    max_batch: int = 64
    """Images per request: batch size × batch count."""
    max_infotext_chars: int = 262_144
    """Characters of a PNG ``parameters`` text that PNG Info reads and parses."""
    max_plot_images: int = 100
    """Images of one X/Y/Z plot: its cells x the images of each."""

    def check(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        steps: int,
        width: int | None,
        height: int | None,
        batch_size: int,
        batch_count: int,
    ) -> None:
        """Raise :class:`LimitExceeded` for the first value over its limit."""
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            check_total(
                f"the {what} has {len(text)} characters", len(text), self.max_prompt_chars, "max_prompt_chars"
            )
        check_total(f"{steps} steps were asked for", steps, self.max_steps, "max_steps")
        if width and height:
            check_total(
                f"{width}x{height} is {width * height} pixels", width * height, self.max_pixels, "max_pixels"
            )
        images = batch_size * batch_count
        check_total(
            f"{batch_size} x {batch_count} = {images} images were asked for",
            images,
            self.max_batch,
            "max_batch",
        )

    def check_request(self, request: Any, width: int | None = None, height: int | None = None) -> None:
        """:meth:`check` for a :class:`~webui.request.GenerationRequest` (its own size unless
        ``width``/``height`` say at what size it will run)."""
        self.check(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            width=width or request.width,
            height=height or request.height,
            batch_size=request.batch_size,
            batch_count=request.batch_count,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**values)

    def validated(self) -> Limits:
        """``self`` after checking every field is a whole number >= 0 (0 = no limit)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequestError(
                    f"{flag_of(f.name)} must be a whole number >= 0 (0 = no limit), got {value!r}"
                )
        return self


LIMIT_FLAGS: dict[str, str] = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(Limits)}


def flag_of(name: str) -> str:
    return LIMIT_FLAGS.get(name, name)


def check_total(description: str, value: int, limit: int, name: str) -> None:
    """Raise :class:`LimitExceeded` when ``value`` is over ``limit`` (0 = no limit)."""
    if limit and value > limit:
        raise LimitExceeded(f"{description}, over this server's limit of {limit} ({flag_of(name)})")


def at_least(low: int, *, meaning: str | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``; argparse prints the one-line message (``must be
    at least 1, got 0``, or ``must be <meaning>, got …``) and exits with status 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {meaning or f'at least {low}'}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


def add_limit_options(parser: argparse.ArgumentParser, *, keep: bool = False) -> None:
    """The ``--max-*`` flags. With ``keep`` their defaults are SUPPRESS (for options repeated after
    a subcommand, so a value given before it is not overwritten)."""
    defaults = Limits()
    group = parser.add_argument_group("limits per request (0 = no limit)")
    helps: dict[str, str] = {
        "max_prompt_chars": "characters of a prompt or negative prompt",
        "max_prompt_chunks": "75-token chunks of the text encoder per prompt",
        "max_steps": "sampling steps",
        "max_pixels": "width x height of an image",
        "max_batch": "images per request (batch size x batch count)",
        "max_infotext_chars": "characters of a PNG's parameters text that PNG Info reads",
        "max_plot_images": "images of one X/Y/Z plot (cells x images per cell)",
    }
    for f in dataclasses.fields(Limits):
        default: Any = argparse.SUPPRESS if keep else getattr(defaults, f.name)
        group.add_argument(
            LIMIT_FLAGS[f.name],
            dest=f.name,
            type=at_least(0, meaning="0 (no limit) or more"),
            default=default,
            metavar="N",
            help=f"{helps[f.name]} (default {getattr(defaults, f.name)})",
        )
