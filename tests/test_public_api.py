"""``webui.api`` is enough: the built-in plugins import nothing else from ``webui``, every name it
exports exists, and every plugin in the folder declares the API version it is written for."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import webui.api
import webui.plugins

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "webui" / "builtin"
BUILTIN_FILES = sorted(path for path in BUILTIN.glob("*.py") if path.name != "__init__.py")


def webui_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``webui`` module in ``path``, also inside functions;
    relative imports are reported as ``.`` plus the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "webui"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module and node.module.split(".")[0] == "webui":
                if node.module == "webui":  # from webui import api / hookspecs ...
                    found += [(node.lineno, f"webui.{alias.name}") for alias in node.names]
                else:
                    found.append((node.lineno, node.module))
    return found


def test_the_checker_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "plugin.py"
    path.write_text(
        "import webui.engine.text\nfrom webui import hookspecs\nfrom webui.api import hookimpl\n"
        "from . import sibling\nimport numpy\n\ndef later():\n    from webui.images import image_to_tensor\n"
    )
    assert webui_imports(path) == [
        (1, "webui.engine.text"),
        (2, "webui.hookspecs"),
        (3, "webui.api"),
        (4, "."),
        (8, "webui.images"),
    ]


def test_the_builtin_folder_is_checked():
    names = {path.stem for path in BUILTIN_FILES}
    assert {module.rsplit(".", 1)[1] for module in webui.plugins.BUILTIN_PLUGINS} <= names


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=lambda path: path.name)
def test_builtin_plugins_import_only_the_public_api(path):
    private = [f"line {line}: {module}" for line, module in webui_imports(path) if module != "webui.api"]
    assert not private, f"{path.name} imports private modules; export what it needs from webui.api: {private}"


@pytest.mark.parametrize("module_name", webui.plugins.BUILTIN_PLUGINS)
def test_builtin_plugins_declare_the_api_version(module_name):
    module = importlib.import_module(module_name)
    assert webui.api.API_VERSION in _versions(getattr(module, webui.plugins.API_ATTRIBUTE))
    assert webui.plugins.api_mismatch(module) is None


def _versions(declared):
    return {declared} if isinstance(declared, int) else set(declared)


def test_every_exported_name_resolves_and_every_import_is_exported():
    exported = webui.api.__all__
    assert len(exported) == len(set(exported)), "a name is listed twice in webui.api.__all__"
    missing = [name for name in exported if not hasattr(webui.api, name)]
    assert not missing, f"webui.api.__all__ lists names it does not define: {missing}"
    tree = ast.parse(Path(webui.api.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    assert imported - set(exported) == set(), "webui.api imports names it does not export in __all__"
    for name in exported:
        assert getattr(webui.api, name) is not None, name


def test_the_api_version_is_one_number_checked_where_plugins_load():
    assert webui.api.API_VERSION is webui.plugins.API_VERSION
    assert isinstance(webui.api.API_VERSION, int) and webui.api.API_VERSION >= 1


@pytest.mark.slow
def test_the_public_api_imports_no_builtin_so_each_builtin_imports_first():
    """A built-in imported first (a fresh interpreter) imports webui.api, which must then load
    completely without importing a built-in (that would be a cycle through a half-loaded module)."""
    modules = [f"webui.builtin.{path.stem}" for path in BUILTIN_FILES]
    code = (
        "import sys, importlib, webui.api\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('webui.builtin.'))\n"
        "assert not loaded, f'webui.api imports built-ins: {loaded}'\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    first = f"import {modules[0]}, {modules[-1]}"  # a built-in as the very first import
    subprocess.run([sys.executable, "-c", first], cwd=ROOT, check=True, timeout=300)
