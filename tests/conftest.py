"""Fixtures shared by the test modules, and the markers' behaviour.

Markers (registered in ``pyproject.toml``): ``browser`` (a real headless Chromium), ``slow`` (real
servers, subprocesses, wheels and virtual environments, long runs of the shipped model) and ``gpu``
(needs CUDA; skipped without it). ``python -m pytest -m "not slow and not browser"`` is the quick run.

The tiny models are built once per test module, not once per test: a test that changes a model's
weights must undo the change (as the engine's patches do) or build its own."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One CPU thread for torch, here and in the subprocesses the tests start (they inherit it): the tiny
# models gain nothing from a second thread, and on a machine busy with other work OpenMP's threads
# wait for each other at every small operation, which made the engine tests ten times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRE_BROWSER = "LATENT_STUDIO_REQUIRE_BROWSER"  # set (as in CI): a missing browser fails, not skips


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where no CUDA device is available (torch is imported only if there are any).
    The example plugins' own suites (under ``examples/``, which their authors run alone) count as
    ``slow`` here: they build models and start servers."""
    for item in items:
        if "examples" in item.path.relative_to(ROOT).parts[:1]:
            item.add_marker(pytest.mark.slow)
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_tests:
        item.add_marker(skip)


# -- engines and tiny models ----------------------------------------------------------------------


@pytest.fixture
def engine():
    """An engine with the built-in plugins only (no installed or drop-in plugins)."""
    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager

    return Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))


@pytest.fixture(scope="module")
def shapes_engine():
    """An engine over the repository's ``models/`` (the shipped shapes model is its default), with the
    built-in plugins only. Loaded once per module."""
    from webui.engine.pipeline import Engine
    from webui.plugins import make_plugin_manager

    return Engine(
        models_dir=str(ROOT / "models"), plugins=make_plugin_manager(entry_points=False, plugin_dirs=[])
    )


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny random SD 1.x components (``components.sd_components``: 4-channel UNet, CLIP text
    encoder, PNDM scheduler), for diffusers' pipelines and for :func:`bundle`."""
    from components import sd_components

    return sd_components(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def bundle(components: dict[str, Any]):
    """The engine's ModelBundle over :func:`components` (the same module objects), named ``tiny``."""
    from components import bundle_from

    return bundle_from(components)


@pytest.fixture(scope="module")
def controlnet_bundle(components: dict[str, Any]):
    """Like :func:`bundle`, with a segmentation ControlNet made from the same UNet (``controlnets["seg"]``).
    The same weights as the ``tiny_model_dir`` folder's, built in memory."""
    from components import bundle_from, make_controlnet

    return bundle_from(components, controlnet=make_controlnet(components["unet"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny diffusers model folder ``<models>/tiny-sd`` with a ``controlnet/`` subfolder, written once
    per test session. Read-only for tests: copy it (``fixtures_models.copy_model``) before damaging it.
    Its parent folder holds nothing else, so it can serve as a ``models_dir``."""
    from fixtures_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", controlnet=True)


# -- the browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """The web app with the HTTP API (``--api``) on the shipped model, for one module."""
    from ui_server import Server

    server = Server(tmp_path_factory.mktemp("outputs"), "--api")
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's ``chromium``) driven by Playwright. Missing, it skips the test, or
    fails it when ``LATENT_STUDIO_REQUIRE_BROWSER`` is set, so CI never mistakes no browser for a pass."""
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "Playwright is not installed (pip install playwright)"
    if missing:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
