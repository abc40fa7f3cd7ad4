"""The plugin tutorial in docs/plugins.md works as written: its plugin, dropped into a plugins folder,
and its test, run by pytest in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from webui.api import make_plugin_manager

pytestmark = pytest.mark.slow  # runs pytest in a subprocess

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "plugins.md"


def tutorial_blocks() -> dict[str, str]:
    """The code blocks docs/plugins.md marks with ``<!-- tutorial: PATH -->``, by path."""
    text = TUTORIAL.read_text(encoding="utf-8")
    found = re.findall(r"<!-- tutorial: (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_the_tutorial_plugin_and_its_test_pass(tmp_path):
    blocks = tutorial_blocks()
    assert set(blocks) == {"plugins/grain.py", "tests/test_grain.py"}
    for path, code in blocks.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code, encoding="utf-8")
    # as a drop-in plugin, it loads without errors and declares its field
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[tmp_path / "plugins"])
    assert [record.error for record in pm.records.values() if record.source == "dropin"] == [None]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_grain.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    assert "2 passed" in process.stdout
