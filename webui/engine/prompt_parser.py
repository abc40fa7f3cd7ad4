"""AUTOMATIC1111's emphasis syntax: a prompt becomes a list of ``(text, weight)`` fragments.

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.21, ``[text]`` divides it by 1.1;
* ``(text:1.3)`` multiplies it by 1.3 (any decimal number, negative ones included);
* groups nest, and their multipliers multiply;
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; any other backslash is kept;
* an opener that is never closed applies its multiplier to the rest of the prompt; a closer with no
  opener of its kind is literal text, and so is ``:1.3)`` outside round brackets;
* the standalone uppercase word ``BREAK`` ends the current chunk of tokens; it becomes the
  :data:`BREAK_FRAGMENT` marker, which brackets never re-weight.

Empty fragments are dropped, adjacent fragments of equal weight are merged, and a prompt with no
text gives ``[("", 1.0)]``.
"""

from __future__ import annotations

import re

Fragment = tuple[str, float]

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

BREAK_WORD = "BREAK"
BREAK_WEIGHT = -1.0
BREAK_FRAGMENT: Fragment = (BREAK_WORD, BREAK_WEIGHT)
"""The marker that forces a new chunk; test for it with :func:`is_break`."""

_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])                                    # \( \) \[ \] \\
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)           # (text:1.3) closer
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+|[\\:])                                # plain text, a lone \ or :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def is_break(fragment: Fragment) -> bool:
    """True for the chunk-break marker produced by a standalone ``BREAK``."""
    return fragment[0] == BREAK_WORD and fragment[1] == BREAK_WEIGHT


class _Builder:
    """Mutable fragment list with bracket bookkeeping."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.weights: list[float] = []
        self.breaks: list[bool] = []
        self.round: list[int] = []
        self.square: list[int] = []

    def add_text(self, text: str) -> None:
        for i, part in enumerate(_BREAK.split(text)):
            if i > 0:
                self._append(BREAK_WORD, BREAK_WEIGHT, is_break=True)
            if part:
                self._append(part, 1.0)

    def add_literal(self, text: str) -> None:
        self._append(text, 1.0)

    def scale_from(self, start: int, factor: float) -> None:
        for i in range(start, len(self.texts)):
            if not self.breaks[i]:
                self.weights[i] *= factor

    def _append(self, text: str, weight: float, *, is_break: bool = False) -> None:
        self.texts.append(text)
        self.weights.append(weight)
        self.breaks.append(is_break)

    def finish(self) -> list[Fragment]:
        for start in self.round:
            self.scale_from(start, ROUND_MULTIPLIER)
        for start in self.square:
            self.scale_from(start, SQUARE_MULTIPLIER)
        merged: list[list] = []
        for text, weight, brk in zip(self.texts, self.weights, self.breaks, strict=True):
            if merged and not brk and not merged[-1][2] and merged[-1][1] == weight:
                merged[-1][0] += text
            else:
                merged.append([text, weight, brk])
        if not merged:
            return [("", 1.0)]
        return [(text, float(weight)) for text, weight, _ in merged]


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split ``text`` into ``(text, weight)`` fragments following A1111's emphasis rules."""
    builder = _Builder()
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            builder.add_literal(match.group("escaped"))
        elif kind == "open_round":
            builder.round.append(len(builder.texts))
        elif kind == "open_square":
            builder.square.append(len(builder.texts))
        elif kind == "weight":
            if builder.round:
                builder.scale_from(builder.round.pop(), float(match.group("weight")))
            else:
                builder.add_text(match.group(0))
        elif kind == "close_round":
            if builder.round:
                builder.scale_from(builder.round.pop(), ROUND_MULTIPLIER)
            else:
                builder.add_literal(")")
        elif kind == "close_square":
            if builder.square:
                builder.scale_from(builder.square.pop(), SQUARE_MULTIPLIER)
            else:
                builder.add_literal("]")
        else:
            builder.add_text(match.group(0))
    return builder.finish()
