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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny diffusers model folder ``<models>/tiny-sd`` with a ``controlnet/`` subfolder, written once
    per test session. Read-only for tests: copy it (``fixtures_models.copy_model``) before damaging it.
    Its parent folder holds nothing else, so it can serve as a ``models_dir``."""
    from fixtures_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", controlnet=True)
