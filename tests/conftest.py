from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def engine():
    """An engine with the built-in plugins only (no installed or drop-in plugins)."""
    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager

    return Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
