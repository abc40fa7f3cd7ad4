"""The layering rules, checked on the source tree instead of trusted to goodwill.

* The engine (``webui/engine/``) never imports gradio or a front-end (``webui.ui``, ``webui.http``,
  ``webui.cli``), and importing all of it loads neither gradio nor the web UI.
* The web UI (``webui/ui/``) never imports torch: no ``import torch`` in it, and importing every
  ``webui.ui`` module leaves ``torch`` out of ``sys.modules`` (the UI reaches the engine through
  modules that load torch only when a generation needs it). An app built over a real engine has
  torch loaded, by the engine, which is the point: the UI can be built and tested without it.
* Built-in plugins import only ``webui.api``: checked in ``tests/test_public_api.py``.
* No import cycles among ``webui`` modules at module level. Imports inside functions run later, so
  a cycle through them does not break loading, but it still ties two layers together: those that
  remain are listed in :data:`DEFERRED_CYCLES`, a list that may only shrink.

The imports are read with :mod:`ast`, so a rule broken in a branch no test runs is still seen.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "webui"

FRONT_ENDS = ("gradio", "webui.ui", "webui.http", "webui.cli")
"""What the engine never imports: gradio and the layers built on top of the engine."""

TORCH_STACK = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "xformers")
"""Torch and the libraries that import it: the web UI imports none of them itself."""

DEFERRED_CYCLES: dict[tuple[str, ...], str] = {
    ("webui.fields", "webui.request"): (
        "the field registry builds and reads GenerationRequest, whose fields it declares"
    ),
    ("webui.http.auth", "webui.http.routes", "webui.ui.server"): (
        "the server starts the HTTP API, which reuses the server's launch checks (LaunchRefused, "
        "read_auth, parse_origins)"
    ),
}
"""Cycles that exist only through imports inside functions (each as its sorted modules), and why.
Remove an entry when its cycle is broken; never add one for a new cycle: break that instead."""


@dataclass(frozen=True)
class Import:
    """One name an import statement brings in: ``target`` is a dotted module name, or a module
    plus a name for ``from module import name`` when that name is itself a module of the tree."""

    importer: str
    target: str
    line: int
    deferred: bool = False  # inside a function: runs when it is called, not when the module loads
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never runs


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``) by dotted name; a package is its
    ``__init__.py``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def read_imports(name: str, path: Path, known: set[str] | dict[str, Path]) -> list[Import]:
    """Every import in module ``name`` (at ``path``), wherever it is: at module level, in a class
    body, in a branch, inside a function (``deferred``) or under ``if TYPE_CHECKING:``
    (``typing_only``). Relative imports are resolved; ``known`` holds the tree's module names,
    to tell ``from package import module`` from ``from module import name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(name, alias.name, node.lineno, deferred, typing_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(name, module, node.lineno, deferred, typing_only))
            found.extend(
                Import(name, f"{module}.{alias.name}", node.lineno, deferred, typing_only)
                for alias in node.names
                if f"{module}.{alias.name}" in known
            )
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child, True, typing_only)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, deferred, True)
            for child in node.orelse:
                visit(child, deferred, typing_only)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, deferred, typing_only)

    visit(tree, False, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == prefix or target.startswith(prefix + ".") for prefix in prefixes)


def import_graph(modules: dict[str, Path], *, deferred: bool) -> dict[str, dict[str, int]]:
    """Importer -> {imported module of the tree: line of the first such import}.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so those count too, except a module's own
    packages: they are loaded (or loading) before the module runs, and a package that imports its
    submodules to offer their names is no cycle. Imports under ``if TYPE_CHECKING:`` never run and
    do not count; those inside functions count only when ``deferred`` is true."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for record in read_imports(name, path, modules):
            if record.typing_only or (record.deferred and not deferred):
                continue
            parts = record.target.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].setdefault(target, record.line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def cycle_path(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """A shortest cycle through the component's first module, as ``module:line`` of each import
    that leads on, e.g. ``webui.a:3 -> webui.b:10 -> webui.a``."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph[node]):
            if target not in members:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                path.reverse()
                steps = [f"{a}:{graph[a][b]}" for a, b in zip(path, path[1:] + [start], strict=True)]
                return " -> ".join([*steps, start])
            if target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _import_in_fresh_interpreter(
    modules: list[str], watched: tuple[str, ...], root: Path = ROOT
) -> dict[str, list[str]]:
    """Import ``modules`` in that order in a new interpreter run in ``root``; for each name in
    ``watched`` that got loaded (itself or a submodule), the ``file:line`` of each import statement
    on the way to its first import (only files under ``root`` when there are any)."""
    code = f"""
import importlib, json, sys, traceback
from pathlib import Path
ROOT, WATCHED, first = Path({str(root)!r}), {watched!r}, {{}}

def within(name, watched):
    return name == watched or name.startswith(watched + ".")

class Witness:
    '''Notes where a watched module is first imported from; the import itself goes on as usual.'''
    def find_spec(self, name, path=None, target=None):
        for watched in WATCHED:
            if within(name, watched) and watched not in first:
                here = [f for f in traceback.extract_stack() if not f.filename.startswith("<")]
                ours = [f for f in here if Path(f.filename).resolve().is_relative_to(ROOT)]
                first[watched] = [
                    f"{{Path(f.filename).resolve().relative_to(ROOT)}}:{{f.lineno}}" if ours
                    else f"{{f.filename}}:{{f.lineno}}" for f in (ours or here)]
        return None

sys.meta_path.insert(0, Witness())
for module in {modules!r}:
    importlib.import_module(module)
loaded = [watched for watched in WATCHED if any(within(name, watched) for name in sys.modules)]
print(json.dumps({{name: first.get(name, ["(loaded before the check began)"]) for name in loaded}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MODULES = modules_of(ROOT, PACKAGE)
ENGINE = sorted(name for name in MODULES if _within(name, ("webui.engine",)))
UI = sorted(name for name in MODULES if _within(name, ("webui.ui",)))


# --- the reader itself ---------------------------------------------------------------------------


def test_the_reader_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from ..other import thing\n")
    (package / "other.py").write_text("")
    (package / "main.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import torch.nn\n"
        "from .sub import leaf\n"
        "from .other import thing\n"
        "if TYPE_CHECKING:\n"
        "    import gradio\n"
        "else:\n"
        "    import numpy\n"
        "try:\n"
        "    import xformers\n"
        "except ImportError:\n"
        "    pass\n"
        "class Holder:\n"
        "    import json\n"
        "    def method(self):\n"
        "        from pkg import other\n"
        "def later():\n"
        "    import PIL.Image\n"
    )
    modules = modules_of(tmp_path, "pkg")
    assert set(modules) == {"pkg", "pkg.sub", "pkg.sub.leaf", "pkg.other", "pkg.main"}
    seen = [
        (r.target, r.line, r.deferred, r.typing_only)
        for r in read_imports("pkg.main", modules["pkg.main"], modules)
    ]
    assert seen == [
        ("typing", 1, False, False),
        ("torch.nn", 2, False, False),
        ("pkg.sub", 3, False, False),
        ("pkg.sub.leaf", 3, False, False),
        ("pkg.other", 4, False, False),
        ("gradio", 6, False, True),
        ("numpy", 8, False, False),
        ("xformers", 10, False, False),
        ("json", 14, False, False),
        ("pkg", 16, True, False),
        ("pkg.other", 16, True, False),
        ("PIL.Image", 18, True, False),
    ]
    assert [r.target for r in read_imports("pkg.sub", modules["pkg.sub"], modules)] == [
        "pkg.sub",
        "pkg.sub.leaf",
    ]
    assert [r.target for r in read_imports("pkg.sub.leaf", modules["pkg.sub.leaf"], modules)] == ["pkg.other"]
    graph = import_graph(modules, deferred=False)
    assert graph["pkg.main"] == {"pkg.sub": 3, "pkg.sub.leaf": 3, "pkg.other": 4}  # not its own package
    assert graph["pkg.sub"] == {"pkg.sub.leaf": 1}
    assert graph["pkg.sub.leaf"] == {"pkg.other": 1}
    assert import_graph(modules, deferred=True)["pkg.main"] == graph["pkg.main"]  # pkg.other seen at line 4


def test_cycles_are_found_and_shown_with_their_imports():
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 1, "d": 2}, "d": {}, "e": {"e": 1}}
    assert cycles(graph) == [["a", "b", "c"]]  # a module "importing itself" is no cycle between modules
    assert cycle_path(graph, ["a", "b", "c"]) == "a:3 -> b:7 -> c:1 -> a"
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_the_layers_are_where_the_rules_look():
    assert "webui.engine.pipeline" in ENGINE and "webui.ui.app" in UI and "webui.ui.tabs.segmap" in UI
    assert "webui.api" in MODULES and not any(name.startswith("webui.builtin") for name in ENGINE + UI)


# --- engine: never gradio, never a front-end ----------------------------------------------------------


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_never_imports_gradio_or_a_front_end(module):
    found = [
        f"line {r.line}: {r.target}"
        for r in read_imports(module, MODULES[module], MODULES)
        if _within(r.target, FRONT_ENDS)
    ]
    assert not found, f"{module} imports what is built on the engine (move the code up a layer): {found}"


@pytest.mark.slow  # a fresh interpreter that imports gradio or torch
def test_importing_the_whole_engine_loads_no_gradio_and_no_ui():
    loaded = _import_in_fresh_interpreter(ENGINE, ("gradio", "webui.ui", "webui.http", "webui.cli"))
    assert not loaded, "importing webui.engine loads " + "; ".join(
        f"{name} (through {' -> '.join(stack)})" for name, stack in loaded.items()
    )


# --- web UI: never torch ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", UI)
def test_the_web_ui_never_imports_torch_itself(module):
    found = [
        f"line {r.line}: {r.target}"
        for r in read_imports(module, MODULES[module], MODULES)
        if _within(r.target, TORCH_STACK)
    ]
    assert not found, f"{module} imports the torch stack; reach it through the engine: {found}"


@pytest.mark.slow  # a fresh interpreter that imports gradio or torch
def test_importing_the_web_ui_leaves_torch_out():
    """``python -c "import webui.ui.app"`` must not load torch, nor must any other ``webui.ui``
    module; the message shows the chain of imports that did."""
    loaded = _import_in_fresh_interpreter(["webui.ui.app", *UI], TORCH_STACK)
    assert not loaded, "importing the web UI loads " + "; ".join(
        f"{name} through {' -> '.join(stack)}" for name, stack in loaded.items()
    )


@pytest.mark.slow  # a fresh interpreter
def test_the_witness_names_the_imports_that_load_a_watched_module(tmp_path):
    """The checks above see a module loaded, also through others, and say through which imports."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "first.py").write_text('"""Imports the next."""\nfrom pkg import second\n')
    (tmp_path / "pkg" / "second.py").write_text("import sys\n\nimport colorsys\nimport xml.dom.minidom\n")
    loaded = _import_in_fresh_interpreter(
        ["pkg.first"], ("colorsys", "xml.dom", "wave", "pkg.second"), tmp_path
    )
    assert loaded == {
        "colorsys": ["pkg/first.py:2", "pkg/second.py:3"],
        "xml.dom": ["pkg/first.py:2", "pkg/second.py:4"],
        "pkg.second": ["pkg/first.py:2"],
    }


# --- no cycles ----------------------------------------------------------------------------------------


def test_no_import_cycles_at_module_level():
    graph = import_graph(MODULES, deferred=False)
    found = [cycle_path(graph, component) for component in cycles(graph)]
    assert not found, (
        "import cycles at module level (module:line of each import that leads on):\n" + "\n".join(found)
    )


def test_cycles_through_deferred_imports_only_shrink():
    graph = import_graph(MODULES, deferred=True)
    found = {tuple(component): cycle_path(graph, component) for component in cycles(graph)}
    new = [path for component, path in found.items() if component not in DEFERRED_CYCLES]
    assert not new, (
        "new import cycles through imports inside functions; break them (move what both "
        "sides need to a module of its own):\n" + "\n".join(new)
    )
    gone = [component for component in DEFERRED_CYCLES if component not in found]
    assert not gone, f"no longer a cycle, remove from DEFERRED_CYCLES: {gone}"
