"""Paths from one place (webui.paths): the data folder is the checkout when run from one, the user's
folder when installed, or the one given with --data-dir; the shipped model is copied into it."""

from __future__ import annotations

import datetime
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from webui import paths

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = (
    paths.DATA_DIR_ENV,
    paths.HOME_ENV,
    paths.CACHE_ENV,
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "LATENT_STUDIO_PLUGIN_DIRS",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No Latent Studio or XDG variable set, and HOME in a temporary folder."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def data(clean_env, monkeypatch):
    """A data folder given as with --data-dir; set through monkeypatch so it is unset afterwards
    whatever the code under test does to the variable."""
    folder = clean_env / "data"
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def installed(monkeypatch):
    """As if the code ran from an installed package (no launch.py beside it)."""
    monkeypatch.setattr(paths, "checkout", lambda: None)


def test_a_checkout_is_its_own_data_folder_but_settings_stay_the_users(clean_env):
    assert paths.checkout() == ROOT
    assert paths.data_dir() == ROOT
    assert (paths.models_dir(), paths.outputs_dir(), paths.plugins_dir()) == (
        ROOT / "models",
        ROOT / "outputs",
        ROOT / "plugins",
    )
    user = clean_env / "home" / ".local" / "share" / "latent-studio"
    assert paths.settings_dir() == paths.user_dir() == user
    assert paths.cache_dir() == clean_env / "home" / ".cache" / "latent-studio"
    assert paths.shipped_model() == ROOT / "models" / "latent-studio-shapes"


def test_an_installed_package_uses_the_users_folder(clean_env, installed, monkeypatch):
    home = clean_env / "home"
    assert paths.data_dir() == home / ".local" / "share" / "latent-studio"
    assert paths.models_dir() == home / ".local" / "share" / "latent-studio" / "models"
    monkeypatch.setenv("XDG_DATA_HOME", str(clean_env / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg-cache"))
    assert paths.outputs_dir() == clean_env / "xdg" / "latent-studio" / "outputs"
    assert paths.settings_dir() == clean_env / "xdg" / "latent-studio"
    assert paths.cache_dir() == clean_env / "xdg-cache" / "latent-studio"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG specification: only absolute paths
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert paths.data_dir() == home / ".local" / "share" / "latent-studio"
    assert paths.cache_dir() == home / ".cache" / "latent-studio"
    monkeypatch.setenv(paths.HOME_ENV, str(clean_env / "studio"))
    assert paths.plugins_dir() == clean_env / "studio" / "plugins"
    assert paths.settings_dir() == clean_env / "studio"
    # the wheel's copy of the default model is the package data, wherever the package lies
    assert paths.shipped_model() is None or paths.shipped_model().parent == paths.PACKAGED_MODELS


def test_the_data_folder_given_holds_everything(data, monkeypatch):
    assert paths.data_dir() == data
    assert (paths.models_dir(), paths.outputs_dir(), paths.plugins_dir()) == (
        data / "models",
        data / "outputs",
        data / "plugins",
    )
    assert paths.settings_dir() == data  # plugins.json and kept wheels too
    assert paths.cache_dir() == data / "cache"
    monkeypatch.setenv(paths.CACHE_ENV, str(data.parent / "elsewhere"))
    assert paths.cache_dir() == data.parent / "elsewhere"
    from webui.plugin_settings import data_dir, settings_path

    assert data_dir() == data and settings_path() == data / "plugins.json"


def test_use_data_dir_makes_the_path_absolute_and_refuses_what_is_not_a_folder(clean_env, monkeypatch):
    monkeypatch.setenv(paths.DATA_DIR_ENV, "unset-afterwards")
    monkeypatch.chdir(clean_env)
    assert paths.use_data_dir("rel/data") == clean_env / "rel" / "data"
    assert os.environ[paths.DATA_DIR_ENV] == str(clean_env / "rel" / "data")
    assert paths.data_dir() == clean_env / "rel" / "data"
    (clean_env / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"^--data-dir a-file is a file, not a folder$"):
        paths.use_data_dir("a-file")
    with pytest.raises(ValueError, match=r"^--data-dir needs a folder$"):
        paths.use_data_dir("  ")
    assert paths.data_dir() == clean_env / "rel" / "data"  # a refused folder changes nothing


def test_drop_in_plugins_come_from_the_data_folder(data):
    from webui.plugins import default_plugin_dirs, make_plugin_manager

    (data / "plugins").mkdir(parents=True)
    (data / "plugins" / "hello.py").write_text("LATENT_STUDIO_API = 1\n")
    assert default_plugin_dirs() == [data / "plugins"]
    pm = make_plugin_manager(entry_points=False)
    assert "plugins/hello.py" in {row["name"] for row in pm.describe()}


# -- the shipped model ----------------------------------------------------------------------------


def test_the_shipped_model_is_copied_into_the_data_folder_once(data):
    source = ROOT / "models" / "latent-studio-shapes"
    assert paths.install_shipped_model() is None
    copy = data / "models" / "latent-studio-shapes"
    compared = filecmp.dircmp(source, copy, ignore=[".model_hash"])
    assert compared.left_only == compared.right_only == compared.diff_files == []
    for sub in compared.common_dirs:
        assert filecmp.dircmp(source / sub, copy / sub, ignore=[".model_hash"]).diff_files == []
    assert not list(copy.rglob(".*")), "hidden files (the checkout's hash stamp) are not copied"
    assert [p.name for p in (data / "models").iterdir()] == ["latent-studio-shapes"]  # no partial copy left
    # an existing folder is never touched: a user's own edits survive every later start
    (copy / "model_index.json").write_text("{}")
    assert paths.install_shipped_model(data / "models") is None
    assert (copy / "model_index.json").read_text() == "{}"


def test_a_models_root_elsewhere_gets_no_copy(data, tmp_path):
    elsewhere = tmp_path / "a1111-models"
    assert paths.install_shipped_model(elsewhere) is None
    assert not elsewhere.exists()
    assert not (data / "models").exists()


def test_an_unusable_data_folder_is_one_line(data):
    data.mkdir()
    (data / "models").write_text("a file where the models folder should be")
    problem = paths.install_shipped_model()
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"cannot copy the default model into {data / 'models'}: ")
    assert problem.endswith("give a writable --data-dir or --models-dir")


def test_in_a_checkout_the_model_is_not_copied_onto_itself(clean_env):
    before = sorted(p.name for p in (ROOT / "models").iterdir())
    assert paths.install_shipped_model() is None
    assert sorted(p.name for p in (ROOT / "models").iterdir()) == before


# -- the command line -----------------------------------------------------------------------------


def test_data_dir_moves_the_default_folders_of_the_server(data, monkeypatch):
    from webui import cli

    served = []
    monkeypatch.setattr("webui.ui.server.serve", lambda args, engine: served.append((args, engine)))
    assert cli.main(["--data-dir", str(data)]) == 0
    args, engine = served[0]
    assert (args.models_dir, args.outputs_dir) == (data / "models", data / "outputs")
    assert engine.models.models_dir == data / "models"
    assert (data / "models" / "latent-studio-shapes" / "model_index.json").is_file()


def test_given_folders_win_over_the_data_folder(data, tmp_path, monkeypatch):
    from webui import cli

    served = []
    monkeypatch.setattr("webui.ui.server.serve", lambda args, engine: served.append(args))
    own = tmp_path / "own-models"
    assert (
        cli.main(["--models-dir", str(own), "--outputs-dir", str(tmp_path / "pics"), "--data-dir", str(data)])
        == 0
    )
    assert (served[0].models_dir, served[0].outputs_dir) == (own, tmp_path / "pics")
    assert not own.exists() and not (data / "models").exists()  # nothing copied into a folder given


def test_a_file_as_data_dir_is_one_line(data, capsys):
    from webui import cli

    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        cli.main(["--data-dir", str(data), "models"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --data-dir {data} is a file, not a folder\n"


@pytest.mark.slow
def test_generate_saves_into_the_data_folder(clean_env):
    """From the checkout with --data-dir after the command: the model is copied there and the image
    is saved under its outputs/, not the checkout's."""
    data = clean_env / "data"
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env.update(HOME=str(clean_env / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "generate",
            "--data-dir",
            str(data),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--seed",
            "3",
        ],
        cwd=clean_env,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    printed = [Path(line) for line in run.stdout.splitlines() if line.strip()]
    days = {
        datetime.date.today().isoformat(),
        (datetime.date.today() - datetime.timedelta(days=1)).isoformat(),
    }
    assert len(printed) == 1 and printed[0].is_file() and printed[0].suffix == ".png"
    assert printed[0].parent.parent == data / "outputs" / "txt2img" and printed[0].parent.name in days
    assert (data / "models" / "latent-studio-shapes" / "unet" / ".model_hash").is_file()  # its stamp, there
