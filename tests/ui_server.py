"""A real Latent Studio web server for the UI tests, started in-process on a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python launch.py`` with the given flags, serving the shipped model until ``close()``.

    ``plugin_dirs``: load drop-in plugins from these folders instead of ``plugins/`` (as
    ``LATENT_STUDIO_PLUGIN_DIRS`` does for ``launch.py``). ``plugins``: plugin objects registered
    in code (then only the built-ins and these load)."""

    def __init__(
        self,
        outputs: Path,
        *flags: str,
        plugin_dirs: Sequence[Path] | None = None,
        plugins: Sequence[Any] | None = None,
    ) -> None:
        from webui.cli import _engine, _maybe_ray, build_parser
        from webui.plugins import PLUGIN_DIRS_ENV
        from webui.ui.server import serve

        self.port = free_port()
        self.outputs = outputs
        argv = ["--port", str(self.port), "--models-dir", str(MODELS), "--outputs-dir", str(outputs), *flags]
        args = build_parser().parse_args(argv)
        saved = os.environ.get(PLUGIN_DIRS_ENV)
        if plugin_dirs is not None:
            os.environ[PLUGIN_DIRS_ENV] = os.pathsep.join(str(folder) for folder in plugin_dirs)
        try:
            # as launch.py does: web names stay inside the model folders, downloads only if allowed
            manager = None
            if plugins is not None:
                from webui.plugins import make_plugin_manager

                manager = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=plugins)
            self.engine = _maybe_ray(
                args, _engine(args, allow_paths=False, allow_download=args.allow_download, plugins=manager)
            )
        finally:
            if plugin_dirs is not None:
                if saved is None:
                    os.environ.pop(PLUGIN_DIRS_ENV, None)
                else:
                    os.environ[PLUGIN_DIRS_ENV] = saved
        self.demo = serve(args, self.engine, block=False)
        self.url = f"http://127.0.0.1:{self.port}/"

    def client(self, **kwargs: Any) -> Any:
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)

    def close(self) -> None:
        self.demo.close()


def endpoint_parameters(client: Any, api: str) -> list[dict[str, Any]]:
    info = client.view_api(return_format="dict", print_info=False)
    return info["named_endpoints"][f"/{api}"]["parameters"]


def arguments(client: Any, api: str, **by_label: Any) -> list[Any]:
    """Positional arguments for ``api``, given by the controls' labels (defaults for the rest)."""
    params = endpoint_parameters(client, api)
    labels = {p["label"] for p in params}
    unknown = set(by_label) - labels
    assert not unknown, f"{api} has no control labelled {unknown}; it has {sorted(labels)}"
    return [by_label[p["label"]] if p["label"] in by_label else p["parameter_default"] for p in params]


def call(client: Any, api: str, **by_label: Any) -> Any:
    return client.predict(*arguments(client, api, **by_label), api_name=f"/{api}")


def submit(client: Any, api: str, **by_label: Any) -> Any:
    return client.submit(*arguments(client, api, **by_label), api_name=f"/{api}")


def call_named(client: Any, api: str, *args: Any) -> dict[str, Any]:
    """Call ``api`` with positional ``args``; its results by the output controls' labels."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][f"/{api}"]
    result = client.predict(*args, api_name=f"/{api}")
    result = result if isinstance(result, (list, tuple)) else [result]
    return {r["label"]: value for r, value in zip(info["returns"], result, strict=True)}
