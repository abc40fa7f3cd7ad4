"""The code checks, run by the test suite so that CI fails when one fails: ruff's lint and format,
and mypy against a baseline that may only shrink (none at all in the engine and the plugin API)."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "mypy-baseline.txt"
STRICT = ("webui/engine/", "webui/hookspecs.py", "webui/api.py")  # no mypy error allowed here
MYPY_LINE = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: (?P<message>.*)$")

pytestmark = pytest.mark.slow


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)


def tool(name: str) -> list[str]:
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return [sys.executable, "-m", name]


def test_ruff_check_passes():
    process = run(*tool("ruff"), "check", ".")
    assert process.returncode == 0, process.stdout + process.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    process = run(*tool("ruff"), "format", "--check", ".")
    assert process.returncode == 0, "run `ruff format .`:\n" + process.stdout + process.stderr


def mypy_errors(text: str) -> collections.Counter[str]:
    """``path: message`` of each error (line numbers left out, so moving code keeps its entry)."""
    found: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        match = MYPY_LINE.match(line.strip())
        if match:
            found[f"{match['path']}: {match['message']}"] += 1
    return found


def test_mypy_finds_no_error_beyond_the_baseline():
    process = run(*tool("mypy"), "webui")
    assert process.returncode in (0, 1), process.stdout + process.stderr  # 2: mypy itself failed
    current = mypy_errors(process.stdout)
    baseline = mypy_errors(
        "\n".join(
            line.replace(": ", ":0: error: ", 1)
            for line in BASELINE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        )
    )
    strict = sorted(error for error in current if error.startswith(STRICT))
    assert not strict, "no mypy errors are allowed in the engine and the plugin API:\n" + "\n".join(strict)
    new = current - baseline
    assert not new, "new mypy errors (fix them; the baseline only shrinks):\n" + "\n".join(sorted(new))
    fixed = baseline - current
    assert not fixed, (
        "these baseline errors are fixed: remove them from mypy-baseline.txt "
        "(python tests/test_checks.py writes it):\n" + "\n".join(sorted(fixed))
    )


def write_baseline() -> None:
    """Write the current mypy errors as the baseline (run by hand after fixing some)."""
    process = run(sys.executable, "-m", "mypy", "webui")
    lines = sorted(mypy_errors(process.stdout).elements())
    BASELINE.write_text(
        "# mypy errors accepted for now: `path: message`, one per error. This list may only\n"
        "# shrink (tests/test_checks.py); rewrite it with `python tests/test_checks.py`.\n"
        + "".join(f"{line}\n" for line in lines),
        encoding="utf-8",
    )


if __name__ == "__main__":
    write_baseline()
