#!/usr/bin/env python3
"""Latent Studio entry point: ``python launch.py --help``."""

from __future__ import annotations

import sys

from webui.cli import main

if __name__ == "__main__":
    sys.exit(main())
