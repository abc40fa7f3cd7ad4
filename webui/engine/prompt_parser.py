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
text gives ``[("", 1.0)]``. Parsing takes time linear in the length of the prompt, however it is
nested or spaced.
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

# Every token is told apart by its first character (and its length); ``findall`` on a pattern
# without groups is the fastest way to cut a long prompt. No alternative can rescan text: a weight
# closer stops at the first character that is not a space, a digit or the point.
_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                                    # \( \) \[ \] \\ (escaped)
    | [()\[\]]                                       # brackets
    | :\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*\)             # (text:1.3) closer
    | [^\\()\[\]:]+ | [\\:]                           # plain text, a lone \ or :
    """,
    re.VERBOSE,
)
# ``\bBREAK\b`` alone, with the whitespace beside each break stripped by hand: a pattern such as
# ``\s*\bBREAK\b\s*`` would rescan a run of whitespace from every position in it (quadratic time).
_BREAK = re.compile(r"\bBREAK\b")


def is_break(fragment: Fragment) -> bool:
    """True for the chunk-break marker produced by a standalone ``BREAK``."""
    return fragment[0] == BREAK_WORD and fragment[1] == BREAK_WEIGHT


def split_breaks(text: str) -> list[str]:
    """``text`` cut at every standalone ``BREAK``, the whitespace on both sides of each break removed
    (the pieces between the breaks, empty ones included), in time linear in ``len(text)``."""
    parts = _BREAK.split(text)
    last = len(parts) - 1
    for i in range(1, last + 1):
        parts[i - 1] = parts[i - 1].rstrip()
        parts[i] = parts[i].lstrip()
    return parts


EXACT_WORK_PER_CHAR = 4
"""Weights are multiplied group by group, in A1111's order, while that takes at most this many
multiplications per character of the prompt; nesting deeper than that (``"(a" * n`` costs about
``n**2 / 2``) switches to one product per group, equal up to rounding, so parsing stays linear."""


class _Builder:
    """The fragments of a prompt, their weights and the bracket groups around them.

    Like A1111, a closed group multiplies the weights of the fragments added since it opened, and
    the groups still open at the end do so last; each of those steps costs the number of fragments
    it covers. Alongside, the groups are kept as two trees (round and square brackets match
    independently): each fragment records the innermost open group of each kind, each group its
    parent and its multiplier. Once the step-by-step work would pass its budget, the weights are
    taken from the trees instead: a product per group and two per fragment.
    """

    def __init__(self, budget: int) -> None:
        self.texts: list[str] = []
        self.breaks: list[bool] = []
        self.weights: list[float] | None = []  # the step-by-step weights; None once over budget
        self.budget = budget
        self.in_round: list[int] = []  # per fragment: innermost open round group, -1 for none
        self.in_square: list[int] = []
        self.round_parent: list[int] = []  # per round group
        self.round_start: list[int] = []  # index of the group's first fragment
        self.round_factor: list[float] = []
        self.square_parent: list[int] = []
        self.square_start: list[int] = []
        self.round: list[int] = []  # the open groups, innermost last
        self.square: list[int] = []

    def add_text(self, text: str) -> None:
        if BREAK_WORD not in text:
            self._append(text)
            return
        for i, part in enumerate(split_breaks(text)):
            if i > 0:
                self._append(BREAK_WORD, is_break=True)
            if part:
                self._append(part)

    def add_literal(self, text: str) -> None:
        self._append(text)

    def open_round(self) -> None:
        self.round_parent.append(self.round[-1] if self.round else -1)
        self.round_start.append(len(self.texts))
        self.round_factor.append(ROUND_MULTIPLIER)  # an unclosed group keeps this multiplier
        self.round.append(len(self.round_parent) - 1)

    def close_round(self, factor: float) -> None:
        group = self.round.pop()
        self.round_factor[group] = factor
        self._scale_from(self.round_start[group], factor)

    def open_square(self) -> None:
        self.square_parent.append(self.square[-1] if self.square else -1)
        self.square_start.append(len(self.texts))
        self.square.append(len(self.square_parent) - 1)

    def close_square(self) -> None:
        self._scale_from(self.square_start[self.square.pop()], SQUARE_MULTIPLIER)

    def _append(self, text: str, *, is_break: bool = False) -> None:
        self.texts.append(text)
        self.breaks.append(is_break)
        self.in_round.append(self.round[-1] if self.round else -1)
        self.in_square.append(self.square[-1] if self.square else -1)
        if self.weights is not None:
            self.weights.append(BREAK_WEIGHT if is_break else 1.0)

    def _scale_from(self, start: int, factor: float) -> None:
        weights = self.weights
        if weights is None or start >= len(weights):
            return
        self.budget -= len(weights) - start
        if self.budget < 0:
            self.weights = None
            return
        tail = zip(weights[start:], self.breaks[start:], strict=True)
        weights[start:] = [w if brk else w * factor for w, brk in tail]

    def _tree_weights(self) -> list[float]:
        round_total: list[float] = []  # product of a group's multiplier and its ancestors'
        for parent, factor in zip(self.round_parent, self.round_factor, strict=True):
            round_total.append((round_total[parent] if parent >= 0 else 1.0) * factor)
        square_total: list[float] = []
        for parent in self.square_parent:
            square_total.append((square_total[parent] if parent >= 0 else 1.0) * SQUARE_MULTIPLIER)
        return [
            BREAK_WEIGHT
            if brk
            else (round_total[r] if r >= 0 else 1.0) * (square_total[s] if s >= 0 else 1.0)
            for brk, r, s in zip(self.breaks, self.in_round, self.in_square, strict=True)
        ]

    def finish(self) -> list[Fragment]:
        for group in self.round:
            if self.weights is None:
                break
            self._scale_from(self.round_start[group], ROUND_MULTIPLIER)
        for group in self.square:
            if self.weights is None:
                break
            self._scale_from(self.square_start[group], SQUARE_MULTIPLIER)
        weights = self.weights if self.weights is not None else self._tree_weights()
        merged: list[tuple[list[str], float, bool]] = []
        for text, weight, brk in zip(self.texts, weights, self.breaks, strict=True):
            if merged and not brk and not merged[-1][2] and merged[-1][1] == weight:
                merged[-1][0].append(text)  # joined once below: no repeated string copies
            else:
                merged.append(([text], weight, brk))
        if not merged:
            return [("", 1.0)]
        return [("".join(parts), float(weight)) for parts, weight, _ in merged]


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split ``text`` into ``(text, weight)`` fragments following A1111's emphasis rules."""
    builder = _Builder(EXACT_WORK_PER_CHAR * len(text))
    for token in _TOKEN.findall(text):
        first = token[0]
        if first == "(":
            builder.open_round()
        elif first == "[":
            builder.open_square()
        elif first == ")":
            if builder.round:
                builder.close_round(ROUND_MULTIPLIER)
            else:
                builder.add_literal(")")
        elif first == "]":
            if builder.square:
                builder.close_square()
            else:
                builder.add_literal("]")
        elif first == ":" and len(token) > 1:  # a weight closer, ":1.3)"
            if builder.round:
                builder.close_round(float(token[1:-1]))  # float() ignores the spaces around
            else:
                builder.add_text(token)
        elif first == "\\" and len(token) == 2:
            builder.add_literal(token[1])
        else:
            builder.add_text(token)
    return builder.finish()
