"""Run the tests against the sources when the package is not installed, and against the Latent
Studio checkout this example ships in when Latent Studio is not installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = PACKAGE_ROOT.parent.parent  # the Latent Studio checkout this example ships in

if importlib.util.find_spec("latent_studio_sketch") is None:  # not pip-installed: test the sources
    sys.path.insert(0, str(PACKAGE_ROOT))
if importlib.util.find_spec("webui") is None and (REPOSITORY / "webui" / "api.py").is_file():
    sys.path.insert(0, str(REPOSITORY))  # Latent Studio not installed: the checkout's


def pytest_configure(config):
    """The marker Latent Studio's own test run uses (so the tests also run on their own without a warning)."""
    config.addinivalue_line(
        "markers", "slow: pip installs and subprocess runs; -m 'not slow' leaves them out"
    )
