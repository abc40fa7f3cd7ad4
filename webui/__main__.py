"""``python -m webui``: the same command line as ``launch.py`` and the ``latent-studio`` command."""

from __future__ import annotations

import sys

from webui.cli import main

if __name__ == "__main__":
    sys.exit(main())
