"""Where Latent Studio keeps its files, decided in one place.

The **data folder** holds ``models/`` (the models root, with the shipped default model),
``outputs/`` (generated images) and ``plugins/`` (drop-in plugin files). It is, first match wins:

1. the folder given with ``--data-dir`` (which sets ``$LATENT_STUDIO_DATA_DIR``, so a restarted
   server and child processes keep it), or ``$LATENT_STUDIO_DATA_DIR`` itself;
2. the checkout, when the code runs from one (``launch.py`` beside the ``webui`` package): its
   ``models/``, ``outputs/`` and ``plugins/`` as they are;
3. the **user folder**: ``$LATENT_STUDIO_HOME``, else ``$XDG_DATA_HOME/latent-studio``, else
   ``~/.local/share/latent-studio`` (an installed package: nothing is written into site-packages).

The plugin settings (``plugins.json``) and the kept plugin wheels belong to the user rather than to
a copy of the code: they live in the data folder given with ``--data-dir``, else in the user folder,
also when running from a checkout. Caches (the checkpoint hash cache) live in
``$LATENT_STUDIO_CACHE_DIR``, else ``cache/`` in a data folder given with ``--data-dir``, else
``$XDG_CACHE_HOME/latent-studio``, else ``~/.cache/latent-studio``. Relative ``XDG_*`` values are
ignored, as the XDG specification says.

An installed package carries the shipped default model read-only inside its wheel; the first run
copies it into the data folder's ``models/`` (offline), where it is an ordinary model folder that
the loader may write its hash stamp into.

Nothing here is created on import and nothing imports more than the standard library, so the
engine, the UI and the command line may all ask.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "DATA_DIR_ENV",
    "HOME_ENV",
    "SHIPPED_MODEL",
    "cache_dir",
    "checkout",
    "data_dir",
    "install_shipped_model",
    "models_dir",
    "outputs_dir",
    "plugins_dir",
    "settings_dir",
    "shipped_model",
    "use_data_dir",
    "user_dir",
]

APP = "latent-studio"
DATA_DIR_ENV = "LATENT_STUDIO_DATA_DIR"  # the data folder (what --data-dir sets)
HOME_ENV = "LATENT_STUDIO_HOME"  # the user folder (plugin settings, kept wheels); tests point it elsewhere
CACHE_ENV = "LATENT_STUDIO_CACHE_DIR"  # the cache folder
SHIPPED_MODEL = "latent-studio-shapes"  # the default model's folder name under models/
PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_MODELS = PACKAGE_DIR / "shipped_models"  # where a wheel carries the default model (see setup.py)


def checkout() -> Path | None:
    """The checkout the code runs from (the folder holding ``launch.py`` and ``webui/``), or None
    for an installed package."""
    root = PACKAGE_DIR.parent
    return root if (root / "launch.py").is_file() else None


def _env_dir(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def _xdg(name: str, fallback: Path) -> Path:
    value = os.environ.get(name, "").strip()
    base = Path(value).expanduser() if value and Path(value).expanduser().is_absolute() else fallback
    return base / APP


def user_dir() -> Path:
    """The per-user folder: ``$LATENT_STUDIO_HOME``, else ``$XDG_DATA_HOME/latent-studio``, else
    ``~/.local/share/latent-studio`` (not created here)."""
    return _env_dir(HOME_ENV) or _xdg("XDG_DATA_HOME", Path.home() / ".local" / "share")


def data_dir() -> Path:
    """The data folder: the one given (``--data-dir``), else the checkout, else :func:`user_dir`."""
    return _env_dir(DATA_DIR_ENV) or checkout() or user_dir()


def models_dir() -> Path:
    """The default models root: ``models/`` in the data folder."""
    return data_dir() / "models"


def outputs_dir() -> Path:
    """Where generated images go by default: ``outputs/`` in the data folder."""
    return data_dir() / "outputs"


def plugins_dir() -> Path:
    """The drop-in plugin folder: ``plugins/`` in the data folder."""
    return data_dir() / "plugins"


def settings_dir() -> Path:
    """Where the plugin settings and kept plugin wheels live: the data folder given with
    ``--data-dir``, else :func:`user_dir` (also in a checkout: they follow the user, not the code)."""
    return _env_dir(DATA_DIR_ENV) or user_dir()


def cache_dir() -> Path:
    """Where caches live: ``$LATENT_STUDIO_CACHE_DIR``, else ``cache/`` in the data folder given
    with ``--data-dir``, else ``$XDG_CACHE_HOME/latent-studio``, else ``~/.cache/latent-studio``."""
    given = _env_dir(DATA_DIR_ENV)
    return _env_dir(CACHE_ENV) or (
        given / "cache" if given else _xdg("XDG_CACHE_HOME", Path.home() / ".cache")
    )


def use_data_dir(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` the data folder of this process and of the processes it starts (what
    ``--data-dir`` does); returns it as an absolute path. Raises ValueError, with a one-line
    message, for an empty path or one that is not a folder."""
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError("--data-dir needs a folder")
    folder = Path(text).expanduser().absolute()
    try:
        not_a_folder = folder.exists() and not folder.is_dir()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--data-dir {str(text)[:200]}: {getattr(error, 'strerror', None) or error}"
        ) from None
    if not_a_folder:
        raise ValueError(f"--data-dir {str(text)[:200]} is a file, not a folder")
    os.environ[DATA_DIR_ENV] = str(folder)
    return folder


def shipped_model() -> Path | None:
    """The default model as this copy of the code carries it: ``models/latent-studio-shapes`` in a
    checkout, the package data inside an installed wheel; None when it is missing."""
    root = checkout()
    folder = (root / "models" if root is not None else PACKAGED_MODELS) / SHIPPED_MODEL
    return folder if (folder / "model_index.json").is_file() else None


def install_shipped_model(models: str | os.PathLike[str] | None = None) -> str | None:
    """Copy the shipped default model into ``models`` (default :func:`models_dir`) when that is the
    data folder's models root and the model is not there yet. A models root given elsewhere (an
    A1111 folder, say) is left alone, and an existing ``latent-studio-shapes`` folder is never
    touched. The copy is made under a temporary name and renamed into place, so an interrupted
    copy leaves nothing half-written behind. Returns a one-line problem, or None when all is well."""
    source = shipped_model()
    target_root = Path(models) if models is not None else models_dir()
    if source is None or not _same(target_root, models_dir()):
        return None
    target = target_root / SHIPPED_MODEL
    if target.exists() or _same(source, target):
        return None
    partial: Path | None = None
    try:
        target_root.mkdir(parents=True, exist_ok=True)
        partial = target_root / f".{SHIPPED_MODEL}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        os.rename(partial, target)  # fails, instead of merging, when another process got there first
    except OSError as error:
        if target.is_dir():  # another process finished the same copy first
            return None
        return (
            f"cannot copy the default model into {target_root}: {error.strerror or error}; "
            "give a writable --data-dir or --models-dir"
        )
    finally:
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False
