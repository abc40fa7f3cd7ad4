"""Saving generated images as PNG files with their infotext.

Files are named ``NNNNN-<seed>.png`` with a 5-digit counter one above the highest counter already
in the directory. Saving is atomic and never overwrites: the PNG is written and fsynced under a
temporary name in the target directory, then hard-linked to its final name, which fails instead of
replacing when that name exists; the next counter is then tried. Concurrent savers (threads or
processes) therefore always end with distinct, complete files.

Choosing the counter and claiming the name happen under a lock (a per-directory thread lock plus,
on POSIX, ``flock`` on the directory), so concurrent savers also get distinct counters. The lock
only keeps counters unique; the no-overwrite guarantee does not depend on it.

:class:`BatchSaver` saves a request's images batch by batch as the engine finishes them (it is
``Engine.generate``'s ``on_batch``), so a later failure, an interrupt or a crash keeps what was
already done, and a failure to save never throws the images away. :func:`check_writable` tells
before any work whether a folder can take the files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.metadata import PARAMETERS_KEY

__all__ = ["BatchSaver", "check_writable", "next_counter", "output_dir", "save_png"]

COUNTER_DIGITS = 5
_COUNTER = re.compile(r"^(\d+)-")
_TEMP_PREFIX = ".saving-"
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
# Errors meaning "this filesystem has no hard links": fall back to reserving the name.
_NO_LINK_ERRNOS = frozenset(
    code
    for code in (
        getattr(errno, "EPERM", None),
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "EOPNOTSUPP", None),
        getattr(errno, "ENOSYS", None),
        getattr(errno, "EMLINK", None),
    )
    if code is not None
)
MAX_ATTEMPTS = 10_000

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def output_dir(root: str | os.PathLike[str], task: str, when: datetime.date | None = None) -> Path:
    """The directory for one task's images of one day: ``root/<task>/<YYYY-MM-DD>``."""
    if not task or task in (".", "..") or "/" in task or "\\" in task:
        raise ValueError(f"Invalid task name for an output directory: {task!r}.")
    day = datetime.date.today() if when is None else when
    return Path(root) / task / day.strftime("%Y-%m-%d")


def next_counter(directory: str | os.PathLike[str]) -> int:
    """One above the highest ``NNNNN-`` counter of the names in ``directory`` (0 when none)."""
    highest = -1
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        match = _COUNTER.match(name)
        if match is not None:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def _png_info(infotext: str | None, extra: Mapping[str, str] | None = None) -> PngInfo | None:
    """A PNG text chunk holding ``infotext`` (and one per ``extra`` entry): tEXt when latin-1
    suffices, iTXt otherwise."""
    chunks = {**({PARAMETERS_KEY: infotext} if infotext is not None else {}), **(extra or {})}
    if not chunks:
        return None
    info = PngInfo()
    for key, text in chunks.items():
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, text)
        else:
            info.add_text(key, text)
    return info


def _png_ready(image: Image.Image) -> Image.Image:
    """``image`` itself if PNG can store its mode, else a converted copy."""
    if image.mode in _PNG_MODES:
        return image
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def _fsync_directory(directory: Path) -> None:
    """Persist the directory entry of a new file where the platform allows it."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialize counter choice in ``directory`` across threads and, where possible, processes."""
    key = os.path.realpath(directory)
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(key, threading.Lock())
    with lock:
        fd = -1
        if fcntl is not None:
            try:
                fd = os.open(directory, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                if fd >= 0:
                    os.close(fd)
                fd = -1
        try:
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # closing the descriptor releases the flock


def _claim_by_reserving(temp: Path, final: Path) -> None:
    """Fallback without hard links: create ``final`` exclusively, then move ``temp`` over it.

    Raises :class:`FileExistsError` if ``final`` exists. The name is ours once created, so the
    replace never clobbers another saver's file.
    """
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    try:
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise


def save_png(
    image: Image.Image,
    directory: str | os.PathLike[str],
    *,
    seed: int,
    infotext: str | None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Save ``image`` as ``directory/NNNNN-<seed>.png`` with ``infotext`` in its ``parameters`` chunk
    (and each ``extra`` entry in a text chunk of its own, e.g. the Extras tab's ``postprocessing``).

    Creates ``directory`` (with parents) if needed and returns the path written. An existing file
    is never overwritten, even with several threads or processes saving into the same directory.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    pnginfo = _png_info(infotext, extra)
    picture = _png_ready(image)

    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".png", dir=target)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if pnginfo is None:
                picture.save(handle, format="PNG")
            else:
                picture.save(handle, format="PNG", pnginfo=pnginfo)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644 & ~_umask())

        with _directory_lock(target):
            final = _claim(temp, target, seed)
        _fsync_directory(target)
        return final
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _claim(temp: Path, target: Path, seed: int) -> Path:
    """Give ``temp`` the first free final name in ``target``; never replaces an existing file."""
    use_links = True
    counter = next_counter(target)
    for _ in range(MAX_ATTEMPTS):
        final = target / f"{counter:0{COUNTER_DIGITS}d}-{seed}.png"
        try:
            if use_links:
                os.link(temp, final)
            else:
                _claim_by_reserving(temp, final)
        except FileExistsError:
            counter = max(counter + 1, next_counter(target))
            continue
        except OSError as error:
            if use_links and error.errno in _NO_LINK_ERRNOS:
                use_links = False
                continue
            raise
        return final
    raise OSError(f"Could not find a free file name in {target} after {MAX_ATTEMPTS} attempts.")


def _umask() -> int:
    """The process umask (read without changing it where the platform allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def check_writable(folder: str | os.PathLike[str]) -> str | None:
    """``None`` when PNGs can be saved into ``folder`` (it exists or can be created), else one line
    saying why not, starting with the folder's name: ``"<folder> is not a writable folder (...)"``.

    Looks without writing anything: the nearest existing folder of ``folder``'s chain must be a
    folder this process may write into, on a file system mounted read-write.
    """
    shown = os.fspath(folder)
    path = Path(os.path.abspath(folder))
    probe = path
    while True:
        try:
            status = os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a file: look further up
            if probe.parent == probe:
                return f"{shown} is not a writable folder (no existing folder above it)"
            probe = probe.parent
        except OSError as error:
            return f"{shown} is not a writable folder ({_reason(error)})"
    where = "it" if probe == path else str(probe)
    if not stat.S_ISDIR(status.st_mode):
        return f"{shown} is not a writable folder ({where} is a file)"
    if _read_only_mount(probe):
        return f"{shown} is not a writable folder ({where} is on a read-only file system)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{shown} is not a writable folder (no permission to write in {where})"
    return None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs on this platform
        return False


def _reason(error: OSError) -> str:
    """The cause of a file error in one line, without the file's name (a temporary one, often)."""
    text = error.strerror or str(error) or type(error).__name__
    return " ".join(text.split())


def _count(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


class BatchSaver:
    """Save a request's images into ``directory`` batch by batch, as ``Engine.generate`` finishes them.

    Pass the saver as ``on_batch``: it is called on the generating thread with each batch's
    ``OutputImage`` list as soon as the batch is decoded, so the files exist before the next batch
    starts and survive a later failure, an interrupt or the process dying. Each image is saved
    with :func:`save_png` (atomic, never overwriting) in the order it came, so one request's names
    are contiguous unless someone else saves into the same folder at the same moment.

    A failure to save (``OSError``: a read-only folder, a full disk) never stops the generation
    and never loses the image: the image stays in :attr:`items` without a file, :attr:`error`
    keeps the first cause in one line, and later images are tried again. ``report`` is called
    with each saved path; ``shown_as`` is how messages name the folder (default: its path).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        report: Callable[[Path], None] | None = None,
        shown_as: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.shown_as = shown_as if shown_as is not None else str(self.directory)
        self.report = report
        self.items: list[tuple[Any, Path | None]] = []  # (OutputImage, its file or None), in order
        self.error: str | None = None

    def __call__(self, images: Iterable[Any]) -> None:
        for item in images:
            path: Path | None = None
            try:
                path = save_png(
                    item.image, self.directory, seed=item.seed, infotext=item.parameters.get("infotext")
                )
            except OSError as error:
                if self.error is None:
                    self.error = _reason(error)
            self.items.append((item, path))
            if path is not None and self.report is not None:
                self.report(path)

    def finish(self, images: Iterable[Any]) -> None:
        """Save those of a request's final ``images`` that no batch handed over (an engine that
        does not call ``on_batch``); images already seen are left alone."""
        seen = {id(item) for item, _ in self.items}
        self([item for item in images if id(item) not in seen])

    @property
    def saved(self) -> list[Path]:
        return [path for _, path in self.items if path is not None]

    @property
    def unsaved(self) -> int:
        return sum(1 for _, path in self.items if path is None)

    def warning(self) -> str | None:
        """One line when some images could not be saved, e.g. ``"2 of 4 images could not be saved
        to outputs/txt2img/2026-11-30: Permission denied"``; ``None`` when all were."""
        if not self.unsaved:
            return None
        count = f"{self.unsaved} of {_count(len(self.items))}" if self.saved else _count(self.unsaved)
        return f"{count} could not be saved to {self.shown_as}: {self.error}"

    def summary(self) -> str | None:
        """For a request that failed after some batches: one line saying what became of the
        finished batches' images, e.g. ``"2 images of the finished batches were saved to
        outputs/txt2img/2026-11-30"``; ``None`` when no batch had finished."""
        if not self.items:
            return None
        saved = len(self.saved)
        if not self.unsaved:
            verb = "was" if saved == 1 else "were"
            return f"{_count(saved)} of the finished batches {verb} saved to {self.shown_as}"
        if not saved:
            return f"the finished batches' {_count(self.unsaved)} could not be saved to {self.shown_as}: {self.error}"
        return (
            f"{saved} of the finished batches' {_count(len(self.items))} saved to {self.shown_as}; "
            f"{self.unsaved} could not be saved: {self.error}"
        )
