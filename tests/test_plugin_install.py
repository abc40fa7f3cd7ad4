"""``launch.py plugins install|uninstall|enable|disable|new`` end to end, offline, in a throwaway
virtual environment made here (the developer's environment is never touched): wheels are built in
the test, installed with the command a user types, listed, used by a real request, turned off,
refused before any of their code runs, and rolled back when ``pip check`` fails."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from wheels import IMPORT_MARKER, ROOT, Venv, build_example_wheel, plugin_wheel, write_wheel

from webui.plugin_admin import TRUST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = "latent-studio-example-plugin"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The folder of test wheels (pip's --find-links in the venv)."""
    folder = tmp_path_factory.mktemp("wheels")
    build_example_wheel(folder)
    return folder


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheels) -> Venv:
    return Venv(tmp_path_factory.mktemp("venv"), wheels)


def rows(venv: Venv, *flags: str) -> dict[str, dict]:
    process = venv.launch(*flags, "plugins", "list")
    assert process.returncode == 0, process.stderr
    return {row["name"]: row for row in json.loads(process.stdout)}


def samplers(venv: Venv, *flags: str) -> list[str]:
    process = venv.launch(*flags, "samplers")
    assert process.returncode == 0, process.stderr
    return process.stdout.splitlines()


def error_line(process) -> str:
    """The one line a failed command printed on stderr."""
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, process.stderr
    return lines[0]


def test_install_list_use_disable_enable_and_uninstall_the_example_plugin(venv, wheels, tmp_path):
    wheel = next(wheels.glob("latent_studio_example_plugin-*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()

    # what will be installed is shown, and nothing happens without a yes
    said_no = venv.launch("plugins", "install", str(wheel), stdin="n\n")
    assert said_no.returncode == 1, said_no.stderr
    assert f"About to install the Latent Studio plugin {EXAMPLE} 0.3.0" in said_no.stdout
    assert f"wheel: {wheel.name} (" in said_no.stdout and f"sha256 {sha}" in said_no.stdout
    assert "entry point: example = latent_studio_example.plugin (plugin API 1)" in said_no.stdout
    assert "requires: no other package" in said_no.stdout
    assert f"    {EXAMPLE} 0.3.0 (new)" in said_no.stdout
    assert TRUST in said_no.stdout
    assert said_no.stdout.rstrip().endswith("not installed")
    assert venv.version(EXAMPLE) is None

    installed = venv.launch("plugins", "install", str(wheel), "--yes")
    assert installed.returncode == 0, installed.stderr
    assert f"installed {EXAMPLE} 0.3.0 (sha256 {sha})" in installed.stdout
    assert venv.version(EXAMPLE) == "0.3.0"
    assert (
        venv.home / "wheels" / wheel.name
    ).read_bytes() == wheel.read_bytes()  # what was installed is kept

    row = rows(venv)[f"{EXAMPLE}:example"]
    assert row["source"] == "entrypoint" and row["version"] == "0.3.0" and row["distribution"] == EXAMPLE
    assert (row["status"], row["enabled"], row["error"]) == ("loaded", True, None)
    assert row["hooks"] == ["prepare_request", "register_schedulers", "write_metadata"]
    assert row["api_versions"] == [1]
    assert (row["sha256"], row["hashed"]) == (sha, "wheel")

    # a real request uses it: its sampler generates and is recorded
    out = tmp_path / "out"
    generated = venv.launch(
        "generate",
        "--prompt",
        "a red circle",
        "--sampler",
        "Euler Trailing",
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert generated.returncode == 0, generated.stderr
    image = Image.open(next(out.rglob("*.png")))
    assert "Sampler: Euler Trailing" in image.text["parameters"]

    assert venv.launch("plugins", "install", str(wheel), "--yes").returncode == 2  # already installed

    disabled = venv.launch("plugins", "disable", EXAMPLE)
    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout.startswith(f"disabled {EXAMPLE}: it is not loaded from the next start")
    assert json.loads((venv.home / "plugins.json").read_text()) == {"disabled": [EXAMPLE]}
    row = rows(venv)[f"{EXAMPLE}:example"]  # listed, not imported: no hooks, so no sampler
    assert (row["status"], row["enabled"], row["hooks"]) == ("disabled", False, [])
    assert row["api_versions"] == [1]  # read from its source

    enabled = venv.launch("plugins", "enable", "example")  # the entry point's own name works too
    assert enabled.returncode == 0, enabled.stderr
    assert "Euler Trailing" in samplers(venv)

    # safe mode: built-ins only (--plugins, only those named: tests/test_plugin_admin.py)
    assert "Euler Trailing" not in samplers(venv, "--safe-mode")
    wrong = venv.launch("--plugins", "no-such-plugin", "samplers")
    assert wrong.returncode == 2
    assert error_line(wrong) == (
        f"error: --plugins: no installed or drop-in plugin is called 'no-such-plugin' (installed: {EXAMPLE})"
    )

    removed = venv.launch("plugins", "uninstall", EXAMPLE, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert f"uninstalled {EXAMPLE} 0.3.0" in removed.stdout
    assert venv.version(EXAMPLE) is None
    assert not (venv.home / "wheels" / wheel.name).exists()


def test_every_other_example_plugin_installs_and_loads(venv, tmp_path):
    """The example packages besides the one above (built here, installed with ``plugins install``)."""
    examples = sorted(
        p.parent for p in (ROOT / "examples").glob("*/pyproject.toml") if p.parent.name != EXAMPLE
    )
    installed = {}
    try:
        for example in examples:
            wheel = build_example_wheel(tmp_path, example)
            process = venv.launch("plugins", "install", str(wheel), "--yes")
            assert process.returncode == 0, process.stderr
            name = wheel.name.split("-")[0].replace("_", "-")
            installed[name] = hashlib.sha256(wheel.read_bytes()).hexdigest()
        listed = {row["distribution"]: row for row in rows(venv).values() if row["distribution"]}
        for name, sha in installed.items():
            row = listed[name]
            assert (row["status"], row["error"], row["sha256"], row["hashed"]) == (
                "loaded",
                None,
                sha,
                "wheel",
            ), row
            assert row["api_versions"] == [1] and row["hooks"]
    finally:
        for name in installed:
            venv.launch("plugins", "uninstall", name, "--yes")


def test_a_wheel_for_another_api_version_is_refused_before_any_of_it_runs(venv, tmp_path):
    marker = tmp_path / "imported"
    venv.env["LS_IMPORT_MARKER"] = str(marker)
    try:
        for api, needs in (("2", "2"), ("range(2, 4)", "2 to 3")):
            wheel = plugin_wheel(
                tmp_path / api.replace(" ", ""),
                "ls-future-plugin",
                api=api,
                body=IMPORT_MARKER.format(name="ls-future-plugin"),
            )
            process = venv.launch("plugins", "install", str(wheel), "--yes")
            assert process.returncode == 2
            assert error_line(process) == (
                f"error: ls-future-plugin 1.0: its plugin 'ls_future_plugin' needs plugin "
                f"API {needs}; this Latent Studio provides API 1: not installed"
            )
            assert "About to install" not in process.stdout
    finally:
        venv.env.pop("LS_IMPORT_MARKER")
    assert venv.version("ls-future-plugin") is None
    assert not marker.exists()


def test_a_wheel_without_an_entry_point_is_refused(venv, tmp_path):
    wheel = write_wheel(tmp_path, "ls-not-a-plugin", "2.1", {"ls_not_a_plugin/__init__.py": "X = 1\n"})
    process = venv.launch("plugins", "install", str(wheel), "--yes")
    assert process.returncode == 2
    assert error_line(process) == (
        "error: ls-not-a-plugin 2.1 declares no latent_studio entry point, so it is not a "
        "Latent Studio plugin: not installed"
    )
    assert venv.version("ls-not-a-plugin") is None


def test_a_failing_pip_check_rolls_everything_back(venv, wheels, tmp_path):
    """ls-base 1.0 is installed and pinned by ls-dependent; the plugin ls-base 2.0 (which also
    brings the new ls-extra) installs, ``pip check`` then fails: ls-extra is uninstalled and
    ls-base 1.0 is back, file for file."""
    old = write_wheel(tmp_path / "old", "ls-base", "1.0", {"ls_base/__init__.py": 'VERSION = "1.0"\n'})
    dependent = write_wheel(
        tmp_path / "old", "ls-dependent", "1.0", {"ls_dependent/__init__.py": ""}, requires=["ls-base==1.0"]
    )
    write_wheel(wheels, "ls-extra", "1.0", {"ls_extra/__init__.py": ""})  # found through --find-links
    new = plugin_wheel(tmp_path / "new", "ls-base", "2.0", module="ls_base", requires=["ls-extra"])
    before = venv.run("-m", "pip", "check").stdout  # problems the environment already has stay out of it
    setup = venv.run("-m", "pip", "install", "--quiet", "--no-deps", str(old), str(dependent))
    assert setup.returncode == 0, setup.stderr
    original = Path(venv.run("-c", "import ls_base; print(ls_base.__file__)").stdout.strip())
    try:
        process = venv.launch("plugins", "install", str(new), "--yes")
        assert "    ls-base 2.0 (replaces 1.0)" in process.stdout
        assert "    ls-extra 1.0 (new)" in process.stdout
        assert process.returncode == 2
        assert error_line(process) == (
            "error: pip check failed after installing ls-base 2.0: ls-dependent 1.0 has "
            "requirement ls-base==1.0, but you have ls-base 2.0.; rolled back, nothing "
            "was changed"
        )
        assert venv.version("ls-base") == "1.0"
        assert venv.version("ls-extra") is None
        assert original.read_text() == 'VERSION = "1.0"\n'
        assert not (original.parent / "plugin.py").exists()
        assert venv.run("-m", "pip", "check").stdout == before  # no problem left behind
        assert not (venv.home / "wheels" / new.name).exists()
    finally:
        venv.run("-m", "pip", "uninstall", "--yes", "--quiet", "ls-base", "ls-dependent", "ls-extra")


def test_new_writes_a_package_that_installs_and_passes_its_own_test(venv, tmp_path):
    made = venv.launch("plugins", "new", "ls-hello", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    package = tmp_path / "ls-hello"
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == [
        ".gitignore",
        "README.md",
        "ls_hello/__init__.py",
        "ls_hello/plugin.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_plugin.py",
    ]
    assert (
        '[project.entry-points.latent_studio]\nls_hello = "ls_hello.plugin"'
        in (package / "pyproject.toml").read_text()
    )

    installed = venv.launch("plugins", "install", str(package), "--yes", "--no-build-isolation")
    assert installed.returncode == 0, installed.stderr
    assert "building a wheel from" in installed.stdout
    try:
        row = rows(venv)["ls-hello:ls_hello"]
        assert (row["status"], row["hooks"], row["api_versions"], row["hashed"]) == (
            "loaded",
            ["write_metadata"],
            [1],
            "wheel",
        )
        tested = venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests"), timeout=600)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "2 passed" in tested.stdout
    finally:
        venv.launch("plugins", "uninstall", "ls-hello", "--yes")
