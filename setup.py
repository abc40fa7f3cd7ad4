"""Packaging that ``pyproject.toml`` cannot say by itself (everything else is there).

The wheel carries the shipped default model, which lives in ``models/latent-studio-shapes`` in the
checkout, as the package data of ``webui.shipped_models``: an installed Latent Studio copies it into
its data folder on the first run (see ``webui/paths.py``), offline. Only that model is packaged (see
``[tool.setuptools.package-data]``), never other models put into ``models/``.
"""

from __future__ import annotations

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["webui", "webui.*"]), "webui.shipped_models"],
    package_dir={"webui.shipped_models": "models"},
)
