"""Plugin management without pip: the settings file (hostile contents too), turning plugins off,
safe mode and --plugins, reading a wheel and a plugin's API declaration without running anything,
``plugins new`` names, and who may manage plugins from the web."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from wheels import IMPORT_MARKER, plugin_wheel, write_wheel

from webui.plugin_admin import PluginAdminError, inspect_wheel, new_plugin, prepare, set_enabled
from webui.plugin_settings import MAX_BYTES, PluginSettings, PluginSettingsError, data_dir, settings_path
from webui.plugins import (
    BUILTIN_PLUGINS,
    ONLY_ENV,
    PLUGIN_DIRS_ENV,
    SAFE_MODE_ENV,
    PluginSelectionError,
    declared_api,
    discover,
    make_plugin_manager,
    match_candidates,
)

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
from diffusers import DDIMScheduler
from webui.api import hookimpl
__version__ = "2.5"
LATENT_STUDIO_API = 1

@hookimpl
def register_schedulers(register):
    register("DDIM {name}", DDIMScheduler)
"""


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Settings in a folder of this test's own; no plugin selection from the environment (set empty,
    which means off, so that whatever a test's flags set there is removed afterwards)."""
    folder = tmp_path / "home"
    monkeypatch.setenv("LATENT_STUDIO_HOME", str(folder))
    monkeypatch.setenv(SAFE_MODE_ENV, "")
    monkeypatch.setenv(ONLY_ENV, "")
    return folder


@pytest.fixture
def dropins(tmp_path, monkeypatch) -> Path:
    """good.py and other.py (each adds a sampler) and marker.py, which writes a file when imported."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name in ("good", "other"):
        (folder / f"{name}.py").write_text(GOOD.format(name=name))
    (folder / "marker.py").write_text(IMPORT_MARKER.format(name="marker.py"))
    monkeypatch.setenv("LS_IMPORT_MARKER", str(tmp_path / "marker-imported"))
    monkeypatch.setenv(PLUGIN_DIRS_ENV, str(folder))
    return folder


def statuses(pm) -> dict[str, tuple[str, bool]]:
    return {
        row["name"]: (row["status"], row["enabled"]) for row in pm.describe() if row["source"] == "dropin"
    }


# -- the settings file ------------------------------------------------------------------------------


def test_the_data_folder_is_the_users_not_the_code_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("LATENT_STUDIO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert settings_path() == tmp_path / "xdg" / "latent-studio" / "plugins.json"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert data_dir() == tmp_path / "user" / ".local" / "share" / "latent-studio"


def test_settings_round_trip_and_a_missing_file_turns_nothing_off(home):
    assert PluginSettings.load().disabled == []
    path = PluginSettings(disabled=["b-pkg", "plugins/a.py", "b-pkg"]).save()
    assert path == home / "plugins.json"
    assert json.loads(path.read_text()) == {"disabled": ["b-pkg", "plugins/a.py"]}
    settings = PluginSettings.load()
    assert settings.is_disabled("plugins/a.py") and settings.is_disabled("x:y", "b-pkg")
    assert not settings.is_disabled("c", None)
    assert [p.name for p in home.iterdir()] == ["plugins.json"]  # no temporary file left behind


FIX = "fix it or delete it (then every plugin is on)"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"disabled": ["a",', "the plugin settings file is not valid JSON (line 1, column 19); " + FIX),
        (
            b'["a"]',
            'the plugin settings file must hold a JSON object like {"disabled": ["name"]}, not a list; '
            + FIX,
        ),
        (
            b'{"disabled": "a"}',
            '"disabled" in the plugin settings file must be a list of plugin names, not a str; ' + FIX,
        ),
        (
            b'{"disabled": ["a", 3]}',
            'entry 1 of "disabled" in the plugin settings file is not a plugin name; ' + FIX,
        ),
        (
            b'{"disabled": ["a\\u0000b"]}',
            'entry 0 of "disabled" in the plugin settings file is not a plugin name '
            "(too long or with control characters); " + FIX,
        ),
        (
            b'{"disabled": ["' + b"x" * 300 + b'"]}',
            'entry 0 of "disabled" in the plugin settings file is not a plugin '
            "name (too long or with control characters); " + FIX,
        ),
        (
            b'{"disabled": [' + b'"a",' * 1000 + b'"a"]}',
            '"disabled" in the plugin settings file has 1001 entries, more than the 1000 it may have; ' + FIX,
        ),
        (b"\xff\xfe{}", "the plugin settings file is not UTF-8 text; " + FIX),
        (b"[" * 100_000 + b"]" * 100_000, "the plugin settings file is not valid JSON; " + FIX),
        (
            b" " * (MAX_BYTES + 1),
            f"the plugin settings file is {MAX_BYTES + 1} bytes, more than the {MAX_BYTES} it may "
            "have; " + FIX,
        ),
    ],
    ids=["truncated", "list", "string", "number", "nul", "long-name", "too-many", "utf16", "deep", "huge"],
)
def test_a_hostile_settings_file_is_refused_in_one_line(home, dropins, content, message):
    home.mkdir()
    (home / "plugins.json").write_bytes(content)
    with pytest.raises(PluginSettingsError) as refused:
        PluginSettings.load()
    assert str(refused.value) == f"{message}: {home / 'plugins.json'}"
    with pytest.raises(PluginSettingsError):
        set_enabled("plugins/good.py", False)  # never overwritten by a change


@pytest.mark.slow
def test_the_cli_refuses_a_broken_settings_file_and_safe_mode_still_starts(home, dropins, tmp_path):
    home.mkdir()
    (home / "plugins.json").write_text("{oops")
    env = dict(os.environ)
    broken = subprocess.run(
        [sys.executable, "launch.py", "plugins", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert broken.returncode == 2
    assert broken.stderr.strip() == (
        f"error: the plugin settings file is not valid JSON (line 1, column 2); {FIX}: "
        f"{home / 'plugins.json'}"
    )
    safe = subprocess.run(
        [sys.executable, "launch.py", "--safe-mode", "plugins", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert safe.returncode == 0, safe.stderr
    rows = {row["name"]: row for row in json.loads(safe.stdout)}
    assert rows["plugins/good.py"]["status"] == "safe mode"
    assert not (tmp_path / "marker-imported").exists()


# -- turning plugins off, safe mode, --plugins --------------------------------------------------------


def test_disabled_plugins_are_listed_but_never_imported(dropins, tmp_path, home):
    assert set_enabled("marker", False).startswith(
        "disabled plugins/marker.py: it is not loaded from the next start"
    )
    assert set_enabled("plugins/good.py", False).startswith("disabled plugins/good.py")
    assert set_enabled("good.py", False) == "plugins/good.py is already disabled"
    pm = make_plugin_manager(entry_points=False)
    assert statuses(pm) == {
        "plugins/good.py": ("disabled", False),
        "plugins/marker.py": ("disabled", False),
        "plugins/other.py": ("loaded", True),
    }
    assert not (tmp_path / "marker-imported").exists()
    rows = {row["name"]: row for row in pm.describe()}
    assert rows["plugins/good.py"]["version"] == "2.5"  # read from the file, not imported
    assert rows["plugins/good.py"]["api_versions"] == [1]
    assert rows["plugins/good.py"]["hooks"] == []
    assert pm.get_plugin("plugins/good.py") is None

    # turned on again: shown at once as pending, loaded from the next start
    assert set_enabled("good", True).startswith("enabled plugins/good.py: it loads from the next start")
    assert statuses(pm)["plugins/good.py"] == ("disabled", True)
    assert statuses(make_plugin_manager(entry_points=False))["plugins/good.py"] == ("loaded", True)


def test_safe_mode_and_only_skip_plugins_without_importing_them(dropins, tmp_path):
    PluginSettings(disabled=["plugins/other.py"]).save()
    safe = make_plugin_manager(entry_points=False, safe_mode=True)
    assert {status for status, _ in statuses(safe).values()} == {"safe mode"}
    assert set(BUILTIN_PLUGINS) <= {row["name"] for row in safe.describe() if row["status"] == "loaded"}
    only = make_plugin_manager(entry_points=False, only=["other", "webui.builtin.text"])
    assert statuses(only) == {
        "plugins/good.py": ("not selected", True),
        "plugins/marker.py": ("not selected", True),
        "plugins/other.py": ("loaded", False),
    }  # named: loaded although disabled
    assert not (tmp_path / "marker-imported").exists()
    everything = make_plugin_manager(entry_points=False)
    assert statuses(everything)["plugins/marker.py"] == ("loaded", True)
    assert (tmp_path / "marker-imported").exists()


def test_the_flags_set_the_environment_every_command_reads(dropins, monkeypatch, capsys):
    from webui.cli import build_parser

    args = build_parser().parse_args(["--plugins", "good, other.py", "samplers"])
    assert args.plugins == ["good", "other.py"]
    assert os.environ[ONLY_ENV] == "good,other.py"
    assert statuses(make_plugin_manager(entry_points=False))["plugins/marker.py"] == ("not selected", True)
    monkeypatch.setenv(ONLY_ENV, "")
    assert build_parser().parse_args(["--safe-mode", "plugins"]).safe_mode is True
    assert os.environ[SAFE_MODE_ENV] == "1"
    assert {s for s, _ in statuses(make_plugin_manager(entry_points=False)).values()} == {"safe mode"}
    for argv, message in (
        (
            ["--safe-mode", "--plugins", "good"],
            "--safe-mode loads no installed plugin and --plugins names some: give one of them",
        ),
        (["--plugins", " , "], "--plugins needs at least one plugin name (--safe-mode loads none)"),
        (["--plugins", "nope"], "--plugins: no installed or drop-in plugin is called 'nope'"),
    ):
        monkeypatch.setenv(SAFE_MODE_ENV, "")
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    monkeypatch.setenv(SAFE_MODE_ENV, "maybe")
    with pytest.raises(
        PluginSelectionError, match="LATENT_STUDIO_SAFE_MODE must be 1 \\(on\\) or 0 \\(off\\)"
    ):
        make_plugin_manager(entry_points=False)


def test_names_match_packages_entry_points_and_files(dropins, tmp_path, monkeypatch):
    dist = tmp_path / "site" / "Fancy_Plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: Fancy_Plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[latent_studio]\nstyles = fancy.styles\nsamplers = fancy.samplers\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = discover()
    names = [c.name for c in found]
    assert {"Fancy_Plugin:styles", "Fancy_Plugin:samplers", "plugins/good.py"} <= set(names)

    def match(name):
        return sorted(c.name for c in match_candidates(name, found))

    assert match("fancy-plugin") == match("FANCY.plugin") == ["Fancy_Plugin:samplers", "Fancy_Plugin:styles"]
    assert match("fancy_plugin:styles") == match("styles") == ["Fancy_Plugin:styles"]
    assert match("good") == match("good.py") == match("plugins/good.py") == ["plugins/good.py"]
    assert match("nothing") == []
    assert set_enabled("Fancy.Plugin", False).startswith("disabled fancy-plugin:")
    assert (
        set_enabled("styles", True)
        == "enabled fancy-plugin: it loads from the next start (restart a running "
        "server to apply it)"
    )
    with pytest.raises(PluginAdminError, match=r"webui.builtin.text is built in"):
        set_enabled("webui.builtin.text", False)
    with pytest.raises(
        PluginAdminError, match=r"no installed or drop-in plugin is called 'nothing' \(installed: "
    ):
        set_enabled("nothing", False)


# -- reading a plugin's API declaration without running it ---------------------------------------------


@pytest.mark.parametrize(
    "source, declared",
    [
        ("LATENT_STUDIO_API = 1\n", 1),
        ("LATENT_STUDIO_API: tuple = (1, 2)\n", (1, 2)),
        ("LATENT_STUDIO_API = range(2, 4)\n", range(2, 4)),
        ("X = 1\nLATENT_STUDIO_API = 1\nLATENT_STUDIO_API = [3]\n", [3]),
        ("import os\n", None),
        ("class Plugin:\n    LATENT_STUDIO_API = 2\n", None),
    ],
)
def test_declared_api_reads_literals(source, declared):
    assert declared_api(source) == declared


def test_declared_api_of_a_class_and_what_it_cannot_read():
    assert declared_api("class Plugin:\n    LATENT_STUDIO_API = {2}\n", "Plugin") == {2}
    for source, attribute in (
        ("from x import V\nLATENT_STUDIO_API = V\n", None),
        ("if True:\n    LATENT_STUDIO_API = 1\n", None),
        ("LATENT_STUDIO_API = range(1, 'x')\n", None),
        ("LATENT_STUDIO_API = __import__('os').system('x')\n", None),
        ("def broken(:\n", None),
        ("(" * 200_000, None),
        ("x = 1\n" * 400_000, None),
        ("plugin = object()\n", "plugin"),
    ):
        with pytest.raises(ValueError):
            declared_api(source, attribute)


# -- reading a wheel ---------------------------------------------------------------------------------


def test_a_plugin_wheel_is_read_without_running_it(tmp_path):
    wheel = plugin_wheel(
        tmp_path, "ls-styles", "1.2", api="(1, 2)", requires=["numpy>=1", "pytest; extra == 'test'"]
    )
    info = inspect_wheel(wheel)
    assert (info.name, info.version, info.requires) == (
        "ls-styles",
        "1.2",
        ["numpy>=1", "pytest; extra == 'test'"],
    )
    assert [(p.name, p.value, p.api, p.readable) for p in info.entry_points] == [
        ("ls_styles", "ls_styles.plugin", (1, 2), True)
    ]
    compiled = write_wheel(
        tmp_path / "c",
        "ls-compiled",
        "1.0",
        {"ls_compiled/__init__.py": ""},
        entry_points="[latent_studio]\nc = ls_compiled.fast:Plugin\n",
    )
    assert inspect_wheel(compiled).entry_points[0].describe() == (
        "c = ls_compiled.fast:Plugin (plugin API: declared in code, checked when it loads)"
    )


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


META = b"Metadata-Version: 2.1\nName: ls-x\nVersion: 1.0\n"
EP = b"[latent_studio]\nx = ls_x.plugin\n"


@pytest.mark.parametrize(
    "members, message",
    [
        (None, "ls_x-1.0-py3-none-any.whl is not a wheel: it is not a zip archive"),
        (
            {"ls_x/__init__.py": b""},
            "ls_x-1.0-py3-none-any.whl is not a wheel: it has 0 .dist-info/METADATA files, not one",
        ),
        (
            {"a.dist-info/METADATA": META, "b.dist-info/METADATA": META},
            "it has 2 .dist-info/METADATA files, not one",
        ),
        (
            {"ls_x-1.0.dist-info/METADATA": b"Version: 1.0\n"},
            "ls_x-1.0-py3-none-any.whl: its METADATA has no valid Name",
        ),
        ({"ls_x-1.0.dist-info/METADATA": b"Name: ../../etc\nVersion: 1\n"}, "its METADATA has no valid Name"),
        (
            {"ls_x-1.0.dist-info/METADATA": b"Name: other\nVersion: 1\n"},
            "ls_x-1.0-py3-none-any.whl: the file name does not match the package inside it (other)",
        ),
        (
            {"ls_x-1.0.dist-info/METADATA": META + b"X: " + b"x" * 2_000_000},
            f"ls_x-1.0.dist-info/METADATA is {len(META) + 2_000_003} bytes, more than the 1048576 it may be",
        ),
        (
            {
                "ls_x-1.0.dist-info/METADATA": META,
                "ls_x-1.0.dist-info/entry_points.txt": b"[latent_studio\nx",
            },
            "ls_x-1.0-py3-none-any.whl: entry_points.txt cannot be read",
        ),
        (
            {"ls_x-1.0.dist-info/METADATA": META, "ls_x-1.0.dist-info/entry_points.txt": b"\xff\xfe["},
            "entry_points.txt is not UTF-8 text",
        ),
        (
            {
                "ls_x-1.0.dist-info/METADATA": META,
                "ls_x-1.0.dist-info/entry_points.txt": b"[console_scripts]\nx = a:b\n",
            },
            "ls-x 1.0 declares no latent_studio entry point, so it is not a Latent Studio plugin: not installed",
        ),
        (
            {
                "ls_x-1.0.dist-info/METADATA": META,
                "ls_x-1.0.dist-info/entry_points.txt": EP,
                "ls_x/plugin.py": b"LATENT_STUDIO_API = 'one'\n",
            },
            "ls-x 1.0: its plugin 'x' declares LATENT_STUDIO_API = 'one', which is neither a whole number nor a collection "
            "of them; this Latent Studio provides API 1: not installed",
        ),
        (
            {
                "ls_x-1.0.dist-info/METADATA": META,
                "ls_x-1.0.dist-info/entry_points.txt": EP,
                "ls_x-1.0.data/purelib/ls_x/plugin.py": b"LATENT_STUDIO_API = (0, 2)\n",
            },
            "ls-x 1.0: its plugin 'x' needs plugin API 0 or 2; this Latent Studio provides API 1: not installed",
        ),
    ],
    ids=[
        "not-zip",
        "no-metadata",
        "two-metadata",
        "no-name",
        "bad-name",
        "other-name",
        "huge-metadata",
        "bad-entry-points",
        "utf16-entry-points",
        "no-plugin",
        "wrong-api-type",
        "wrong-api-in-data",
    ],
)
def test_a_hostile_or_foreign_wheel_is_refused_in_one_line(tmp_path, members, message):
    path = tmp_path / "ls_x-1.0-py3-none-any.whl"
    if members is None:
        path.write_bytes(b"PK\x03\x04 not really")
    else:
        _zip(path, members)
    with pytest.raises(PluginAdminError) as refused:
        inspect_wheel(path)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "say what to install: a package name, a .whl file, a folder or a URL"),
        ("-r requirements.txt", "'-r requirements.txt' looks like a pip option"),
        ("--index-url=https://evil.example/simple x", "looks like a pip option"),
        ("a\nb", "the install spec must be one line of at most 2000 characters"),
        ("x" * 2001, "the install spec must be one line of at most 2000 characters"),
        ("missing/plugin.whl", "no such file or folder: missing/plugin.whl"),
    ],
)
def test_install_specs_are_checked_before_pip_runs(spec, message):
    with pytest.raises(
        PluginAdminError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        prepare(spec)


def test_the_web_installs_wheels_only(tmp_path):
    (tmp_path / "project").mkdir()
    with pytest.raises(
        PluginAdminError, match="the web app installs wheels only; build and install a project folder"
    ):
        prepare(str(tmp_path / "project"), from_web=True)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PluginAdminError, match="notes.txt is neither a wheel"):
        prepare(str(tmp_path / "notes.txt"))


# -- plugins new -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("../escape", "'../escape' is not a package name"),
        ("a", "'a' is not a package name"),
        ("my plugin", "'my plugin' is not a package name"),
        ("x" * 65, "is not a package name"),
        ("Class", "Class would make a module called class, which is taken"),
        ("webui", "webui would make a module called webui, which is taken"),
        ("json", "a module called json is already installed here; choose another name"),
    ],
)
def test_new_refuses_bad_names(tmp_path, name, message):
    with pytest.raises(PluginAdminError, match=message.replace(".", r"\.")):
        new_plugin(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_new_writes_the_package_with_its_name_everywhere(tmp_path):
    folder = new_plugin("ls.Shiny-Thing", tmp_path)
    assert folder == tmp_path / "ls.Shiny-Thing"
    pyproject = (folder / "pyproject.toml").read_text()
    assert 'name = "ls.Shiny-Thing"' in pyproject and 'ls_shiny_thing = "ls_shiny_thing.plugin"' in pyproject
    plugin = (folder / "ls_shiny_thing" / "plugin.py").read_text()
    assert declared_api(plugin) == 1 and 'parameters["ls-Shiny-Thing"] = "on"' in plugin
    assert '"ls-Shiny-Thing: on" in result.infotexts[0]' in (folder / "tests" / "test_plugin.py").read_text()
    with pytest.raises(PluginAdminError, match="already exists; choose another name or --dir"):
        new_plugin("ls.Shiny-Thing", tmp_path)


# -- who may manage plugins from the web ---------------------------------------------------------------


def server_args(*flags: str) -> argparse.Namespace:
    from webui.cli import build_parser

    return build_parser().parse_args(list(flags))


@pytest.mark.parametrize(
    "flags, allowed",
    [
        ((), True),
        (("--auth", "a:b"), True),
        (("--listen", "--auth", "a:b"), False),
        (("--share", "--auth", "a:b"), False),
        (("--listen", "--insecure"), False),
        (("--listen", "--auth", "a:b", "--enable-plugin-install"), True),
    ],
)
def test_only_a_loopback_server_or_an_explicit_flag_manages_plugins(flags, allowed):
    from webui.ui.server import exposure_problem, plugin_control_problem

    args = server_args(*flags)
    problem = plugin_control_problem(args)
    assert (problem is None) == allowed
    if not allowed:
        assert "--enable-plugin-install" in problem and "started with --" in problem
    assert exposure_problem(args, [("a", "b")] if "--auth" in flags else []) is None


def test_enable_plugin_install_on_the_network_needs_a_login_even_with_insecure():
    from webui.ui.server import exposure_problem

    problem = exposure_problem(server_args("--listen", "--insecure", "--enable-plugin-install"), [])
    assert problem == (
        "--enable-plugin-install with --listen would let anyone who can reach this machine install "
        "code that runs on it; it needs a login (--auth or --auth-file), even with --insecure"
    )
    assert (
        exposure_problem(server_args("--enable-plugin-install"), []) is None
    )  # on 127.0.0.1 it is the default


def test_the_tab_says_what_the_next_start_changes(dropins):
    from webui.ui.tabs.plugins import choices, rows

    set_enabled("other", False)
    pm = make_plugin_manager(entry_points=False)
    set_enabled("good", False)
    set_enabled("other", True)
    (dropins / "fresh.py").write_text(GOOD.format(name="fresh"))
    (dropins / "marker.py").unlink()
    table = {row[0]: row for row in rows(pm)}
    assert table["plugins/good.py"][4] == "loaded; disabled from the next start"
    assert table["plugins/other.py"][4] == "disabled; enabled from the next start"
    assert table["plugins/fresh.py"][4] == "installed: loads after a restart"
    assert table["plugins/marker.py"][4] == "uninstalled: gone after a restart"
    assert table["plugins/good.py"][5] == "1"
    assert table["plugins/good.py"][6].endswith(" (file)") and len(table["plugins/good.py"][6]) == 64 + 7
    assert table["webui.builtin.text"][4:] == ["loaded", "1", ""]
    assert set(choices(pm)) == {
        "plugins/good.py",
        "plugins/other.py",
        "plugins/fresh.py",
        "plugins/marker.py",
    }
