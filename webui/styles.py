"""Prompt styles: AUTOMATIC1111's ``styles.csv``, read, applied and saved.

A styles file is CSV with a header naming its columns, ``name,prompt,negative_prompt`` (A1111's
older ``text`` column is read as ``prompt``; other columns are ignored), values quoted as CSV
quotes them. A style's prompt wraps the user's prompt at its ``{prompt}`` placeholder; without one
it is appended after ", " (the same for the negative prompt), as A1111 does.

Where styles come from, first match of a name wins:

1. ``styles.csv`` in the data folder (:func:`webui.paths.data_dir`), the file "Save style" writes;
2. ``styles.csv`` at the root of an AUTOMATIC1111 install whose ``models`` folder is one of the
   engine's models roots (``--models-dir`` or ``--extra-models-dir ~/stable-diffusion-webui/models``),
   read only.

A file is read again when its size or modification time changes. Reading is linear in the file's
size; a file over :data:`MAX_BYTES` or :data:`MAX_ROWS` rows is refused whole (one log line, the
other files still serve), a bad row is skipped with a warning naming its line, and a file that is
not UTF-8 (with or without a byte order mark) is read as Latin-1.

This module imports neither torch nor gradio.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webui.errors import InvalidRequestError

__all__ = [
    "MAX_BYTES",
    "MAX_ROWS",
    "PLACEHOLDER",
    "Style",
    "apply_style",
    "apply_styles",
    "check_names",
    "load_styles",
    "parse_styles",
    "read_styles_file",
    "save_style",
    "style_files",
    "styles_csv",
    "unwrap_style",
]

log = logging.getLogger(__name__)

FILE_NAME = "styles.csv"
PLACEHOLDER = "{prompt}"
MAX_BYTES = 1024 * 1024  # a styles file over this is refused whole
MAX_ROWS = 10_000  # and one with more rows than this
MAX_NAME_CHARS = 200
MAX_STYLES = 100  # styles in one request
HEADER = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    """One style: its name, its prompt and negative prompt (each may hold ``{prompt}``) and the
    file it came from."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: str = ""


# -- applying -------------------------------------------------------------------------------------


def apply_style(text: str, style_text: str) -> str:
    """``text`` with ``style_text`` applied: put in at ``{prompt}``, else appended after ", "."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


def unwrap_style(text: str, style_text: str) -> str | None:
    """The text that :func:`apply_style` turned into ``text`` with ``style_text``, or None when
    ``text`` does not carry the style (the reverse of :func:`apply_style`)."""
    if PLACEHOLDER in style_text:
        before, _, after = style_text.partition(PLACEHOLDER)
        if PLACEHOLDER in after:  # several placeholders: only the plain case is recognised
            return None
        if len(text) >= len(before) + len(after) and text.startswith(before) and text.endswith(after):
            return text[len(before) : len(text) - len(after)]
        return None
    style_text = style_text.strip()
    if not style_text:
        return text
    stripped = text.strip()
    if stripped == style_text:
        return ""
    if stripped.endswith(", " + style_text):
        return stripped[: -len(style_text) - 2]
    return None


def _styled(text: str, texts: Sequence[str]) -> str:
    """``text`` with each of ``texts`` applied in order, unless ``text`` carries all of them
    already (a prompt sent from PNG Info with its styles): then it is kept as it is."""
    rest: str | None = text
    for style_text in reversed(texts):
        rest = unwrap_style(rest, style_text) if rest is not None else None
    if rest is not None:
        return text
    for style_text in texts:
        text = apply_style(text, style_text)
    return text


def apply_styles(prompt: str, negative_prompt: str, styles: Sequence[Style]) -> tuple[str, str]:
    """The prompt and negative prompt with ``styles`` applied in order. A text that already
    carries every style (the final prompt of an image, sent back from PNG Info) is kept as it is,
    so a style is never applied twice."""
    return (
        _styled(prompt, [style.prompt for style in styles]),
        _styled(negative_prompt, [style.negative_prompt for style in styles]),
    )


def check_names(names: Iterable[str], styles: Mapping[str, Style]) -> list[Style]:
    """The styles called ``names``, in order; an unknown name raises :class:`InvalidRequestError`
    naming the closest known ones."""
    found: list[Style] = []
    for name in names:
        style = styles.get(name)
        if style is None:
            close = difflib.get_close_matches(str(name)[:MAX_NAME_CHARS], list(styles), n=3)
            hint = (
                f"; did you mean {' or '.join(repr(c) for c in close)}?"
                if close
                else ("; no styles are defined" if not styles else f"; {len(styles)} styles are defined")
            )
            raise InvalidRequestError(f"unknown style {str(name)[:80]!r}{hint}")
        found.append(style)
    return found


# -- reading --------------------------------------------------------------------------------------


def decode(data: bytes) -> str:
    """The text of a styles file: UTF-8 (a byte order mark dropped), else Latin-1."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_styles(text: str, source: str = FILE_NAME) -> tuple[dict[str, Style], list[str]]:
    """The styles in a styles file's text, by name (a later row of a name wins, as in A1111), and
    one warning per row skipped (naming its line). A file without a ``name`` column, or with more
    than :data:`MAX_ROWS` rows, gives no style and one warning."""
    styles: dict[str, Style] = {}
    warnings: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as error:
        return {}, [f"{source}: line 1: {error}; no style read"]
    if header is None:
        return {}, []
    columns = [column.strip().lower() for column in header]
    if "name" not in columns:
        return {}, [
            f"{source}: the first line must name the columns (name,prompt,negative_prompt); no style read"
        ]
    at_name = columns.index("name")
    at_prompt = (
        columns.index("prompt")
        if "prompt" in columns
        else (columns.index("text") if "text" in columns else None)
    )
    at_negative = columns.index("negative_prompt") if "negative_prompt" in columns else None
    rows = 0
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            warnings.append(f"{source}: line {line}: {error}; the rest of the file is skipped")
            break
        rows += 1
        if rows > MAX_ROWS:
            return {}, [f"{source} has more than {MAX_ROWS} rows; no style read from it"]
        if not row or not any(cell.strip() for cell in row):
            continue
        name = row[at_name].strip() if at_name < len(row) else ""
        problem = _name_problem(name)
        if problem:
            warnings.append(f"{source}: line {line}: {problem}; row skipped")
            continue
        prompt = row[at_prompt] if at_prompt is not None and at_prompt < len(row) else ""
        negative = row[at_negative] if at_negative is not None and at_negative < len(row) else ""
        styles[name] = Style(name, prompt, negative, source)
    return styles, warnings


def _name_problem(name: str) -> str | None:
    if not name:
        return "no name"
    if len(name) > MAX_NAME_CHARS:
        return f"the name has {len(name)} characters (at most {MAX_NAME_CHARS})"
    if any(ord(ch) < 32 for ch in name):
        return "the name holds a control character"
    return None


def read_styles_file(path: Path) -> tuple[dict[str, Style], list[str]]:
    """The styles of one file and its warnings (a missing file: none and none; a file over
    :data:`MAX_BYTES`: none and one warning, read no further than its size)."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            return {}, [
                f"{path} is {size} bytes, over the limit of {MAX_BYTES} for a styles file; no style read"
            ]
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}, []
    except OSError as error:
        return {}, [f"cannot read {path}: {error.strerror or error}"]
    if len(data) > MAX_BYTES:  # it grew while being read
        return {}, [f"{path} is over the limit of {MAX_BYTES} bytes for a styles file; no style read"]
    return parse_styles(decode(data), str(path))


def styles_csv() -> Path:
    """The user's styles file: ``styles.csv`` in the data folder (the one "Save style" writes)."""
    from webui.paths import data_dir

    return data_dir() / FILE_NAME


def style_files(engine: Any = None) -> list[Path]:
    """The styles files read, in order: the data folder's, then the ``styles.csv`` of each
    AUTOMATIC1111 install whose ``models`` folder is one of ``engine``'s models roots."""
    files = [styles_csv()]
    models = getattr(engine, "models", None)
    roots = [getattr(models, "models_dir", None), *(getattr(models, "extra_models_dirs", None) or [])]
    for root in roots:
        if root is None:
            continue
        root = Path(root).expanduser().resolve()
        if root.name.lower() == "models":
            candidate = root.parent / FILE_NAME
            if all(candidate != known.resolve() for known in files) and candidate.is_file():
                files.append(candidate)
    return files


_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Style]]] = {}
_CACHE_LOCK = threading.Lock()


def load_styles(engine: Any = None, files: Sequence[Path] | None = None) -> dict[str, Style]:
    """Every style on offer by name (the first file naming a style wins), each file read again
    only when it changed; its warnings are logged once per change."""
    merged: dict[str, Style] = {}
    for path in files if files is not None else style_files(engine):
        for name, style in _file_styles(Path(path)).items():
            merged.setdefault(name, style)
    return merged


def _file_styles(path: Path) -> dict[str, Style]:
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        with _CACHE_LOCK:
            _CACHE.pop(path, None)
        return {}
    with _CACHE_LOCK:
        cached = _CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    styles, warnings = read_styles_file(path)
    for warning in warnings:
        log.warning("%s", warning)
    with _CACHE_LOCK:
        _CACHE[path] = (stamp, styles)
    return styles


# -- saving ---------------------------------------------------------------------------------------


def save_style(name: str, prompt: str, negative_prompt: str, path: Path | None = None) -> Path:
    """Save a style in the user's styles file (``path``, default :func:`styles_csv`): a style of
    the same name is replaced, as in A1111, the others kept in their order; written atomically,
    every value quoted. Raises :class:`InvalidRequestError` for a bad name or a file it will not
    rewrite (too big, unreadable), ``OSError`` when writing fails."""
    from webui.atomic import write_text_atomic

    name = str(name).strip()
    problem = _name_problem(name)
    if problem:
        raise InvalidRequestError(f"style name: {problem}")
    path = path if path is not None else styles_csv()
    existing, warnings = read_styles_file(path)
    if warnings and not existing and path.exists() and path.stat().st_size:
        raise InvalidRequestError(f"{warnings[0]}; fix or move it before saving a style")
    rows = dict(existing)
    rows[name] = Style(name, prompt, negative_prompt, str(path))
    out = io.StringIO(newline="")
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(HEADER)
    for style in rows.values():
        writer.writerow((style.name, style.prompt, style.negative_prompt))
    text = out.getvalue()
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise InvalidRequestError(f"saving this style would make {path} bigger than {MAX_BYTES} bytes")
    write_text_atomic(path, text)
    return path


def format_names(names: Sequence[str]) -> str:
    """Style names as the infotext writes them: a JSON array (``["a", "b"]``)."""
    return json.dumps(list(names), ensure_ascii=False)
