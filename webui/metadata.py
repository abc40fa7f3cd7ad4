"""Generation metadata in AUTOMATIC1111's "parameters" infotext format.

An infotext is the prompt (one or more lines), an optional ``Negative prompt: ...`` line, and a
final line of ``Key: value`` pairs separated by ``", "``::

    a cat in a hat,
    oil painting
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Lora hashes: "a: 1, b: 2"

Values holding ``,``, ``:``, ``"`` or a newline are written as JSON strings. The text is stored in
a PNG's ``parameters`` text chunk, where AUTOMATIC1111, its forks and most image browsers read it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

__all__ = [
    "PARAMETERS_KEY",
    "format_infotext",
    "format_value",
    "parse_infotext",
    "read_png_parameters",
]

PARAMETERS_KEY = "parameters"
"""Name of the PNG text chunk that holds the infotext."""

NEGATIVE_PREFIX = "Negative prompt:"

# The pieces of one ``Key: value`` pair of the parameters line, read by :func:`_parse_pairs`. A key
# starts with a word character and has at least two characters (letters, digits, spaces, ``-``,
# ``/``); a value is either a JSON string (backslash escapes allowed) or anything up to the next comma.
_WORD = re.compile(r"\w")
_KEY_REST = re.compile(r"[\w \-/]*")
_SPACE = re.compile(r"\s*")
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEEDS_QUOTES = (",", ":", '"', "\n")

# A line is taken as the parameters line only when it holds at least this many pairs.
MIN_PARAMETER_PAIRS = 3


def format_value(value: object) -> str:
    """Write one parameter value as text: integral floats without ``.0``, other values by ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def _quote(text: str) -> str:
    """Quote ``text`` as a JSON string if it would otherwise break the parameters line."""
    if any(ch in text for ch in _NEEDS_QUOTES):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    """Undo :func:`_quote`; text that is not a valid JSON string is returned unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Build an infotext from the prompts and the ordered generation parameters.

    ``None`` values are skipped; the ``Negative prompt:`` line is written only when the negative
    prompt is not blank. Raises :class:`ValueError` for a key that the parser could not read back.
    """
    pairs: list[str] = []
    for key, value in params.items():
        if value is None:
            continue
        if not _KEY.fullmatch(key):
            raise ValueError(
                f"Invalid infotext key {key!r}: use at least two letters, digits, spaces, '-' or '/'."
            )
        pairs.append(f"{key}: {_quote(format_value(value))}")
    text = prompt
    if negative_prompt and negative_prompt.strip():
        text += f"\n{NEGATIVE_PREFIX} {negative_prompt}"
    text += "\n" + ", ".join(pairs)
    return text.strip()


def _run_end(pattern: re.Pattern[str], line: str, pos: int) -> int:
    """Where the run that ``pattern`` (a single repeated class) matches from ``pos`` ends."""
    match = pattern.match(line, pos)
    return pos if match is None else match.end()


def _string_end(line: str, pos: int) -> int:
    """Where the body of a JSON-quoted string starting at ``pos`` stops: at the first ``"`` that is
    not escaped, at a backslash before a newline or the end, or at the end of ``line``."""
    while True:
        found = _QUOTE_OR_ESCAPE.search(line, pos)
        if found is None:
            return len(line)
        pos = found.start()
        if line[pos] == '"' or pos + 1 == len(line) or line[pos + 1] == "\n":
            return pos
        pos += 2  # an escaped character


def _parse_pairs(line: str) -> list[tuple[str, str]]:
    r"""All ``(key, raw value)`` pairs found in ``line``, in time linear in its length.

    The pairs are those of the pattern ``\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)``
    found left to right, without its quadratic time: a run of key characters not followed by ``:``
    is skipped as a whole instead of being tried again from each of its characters.
    """
    pairs: list[tuple[str, str]] = []
    end = len(line)
    pos = 0
    while True:
        word = _WORD.search(line, pos)
        if word is None:
            return pairs
        start = word.start()
        colon = _run_end(_KEY_REST, line, start + 1)
        if colon == end or line[colon] != ":" or colon - start < 2:
            # A key starting later in this run would end at the same place, so it cannot match
            # either; a try from the run's trailing spaces is the same as a try from ``colon``.
            pos = colon
            continue
        value_start = _run_end(_SPACE, line, colon + 1)
        value_end = -1
        if value_start < end and line[value_start] == '"':
            close = _string_end(line, value_start + 1)
            after = close + 1
            if close > value_start + 1 and close < end and line[close] == '"':
                if after < end and line[after] == ",":
                    value_end, pos = after, after + 1
                elif after == end or (after == end - 1 and line[after] == "\n"):  # ``$``
                    value_end, pos = after, after
        if value_end < 0:  # anything up to the next comma, which is consumed
            comma = line.find(",", value_start)
            value_end, pos = (end, end) if comma < 0 else (comma, comma + 1)
        pairs.append((line[start:colon], line[value_start:value_end]))


def parse_infotext(text: str) -> dict[str, str]:
    """Parse an infotext into ``{"Prompt", "Negative prompt", <key>: <value>...}``.

    Values stay strings, with JSON quoting removed. A ``WxH`` value such as ``Size: 512x768`` is
    also split into ``"Size-1"`` (``"512"``) and ``"Size-2"`` (``"768"``). The last line is read
    as the parameters line only if it holds at least three ``Key: value`` pairs; otherwise it is
    part of the prompt.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    params_line = lines[-1]
    pairs = _parse_pairs(params_line)
    if len(pairs) < MIN_PARAMETER_PAIRS:
        pairs = []
    else:
        lines = lines[:-1]

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, str] = {
        "Prompt": "\n".join(prompt_lines),
        "Negative prompt": "\n".join(negative_lines),
    }
    for key, raw_value in pairs:
        value = _unquote(raw_value)
        result[key] = value
        size = _SIZE.match(value)
        if size is not None:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
    return result


def _text_chunk(image: Image.Image) -> str | None:
    """The ``parameters`` text of an image (a PNG, or one built in memory), else ``None``."""
    if image.format not in (None, "PNG"):
        return None
    # ``text`` also reads chunks stored after the image data; ``info`` may not hold those yet.
    chunks = getattr(image, "text", None)
    if chunks is None:
        chunks = image.info
    value = chunks.get(PARAMETERS_KEY)
    return None if value is None else str(value)


def read_png_parameters(path_or_image: str | os.PathLike[str] | Image.Image) -> str | None:
    """The ``parameters`` tEXt/iTXt/zTXt chunk of a PNG file or opened image, else ``None``."""
    if isinstance(path_or_image, Image.Image):
        return _text_chunk(path_or_image)
    with Image.open(Path(path_or_image)) as image:
        return _text_chunk(image)
