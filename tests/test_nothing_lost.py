"""Nothing generated is lost: each batch is saved as soon as it is decoded, so a later failure, an
interrupt, a client that went away or a crash keeps it; a failure to save keeps the images too.

The web side runs through :class:`StudioService` (what the Generate button calls), the command
line through ``webui.cli.main`` in-process, and once as a real process that dies in batch 2.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from components import bundle_from, sd_components
from PIL import Image

import webui.cli as cli
import webui.output as output
from webui.api import Engine, GenerationRequest, hookimpl, make_plugin_manager
from webui.engine.stream import Progress
from webui.errors import GenerationError
from webui.metadata import read_png_parameters
from webui.output import BatchSaver, check_writable, output_dir
from webui.ui.service import Finished, GenerationFailed, StudioService

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

REPO_ROOT = Path(__file__).resolve().parent.parent
# two batches of two images; no guidance (one UNet pass a step) keeps it quick on a CPU
REQUEST = GenerationRequest(
    model="tiny",
    prompt="a red square",
    steps=2,
    seed=40,
    width=64,
    height=64,
    sampler="Euler",
    cfg_scale=1.0,
    batch_size=2,
    batch_count=2,
)
SEEDS = [40, 41, 42, 43]


class Trouble:
    """A plugin that, when armed, does ``action`` at the first step of batch ``batch`` (0-based)."""

    def __init__(self) -> None:
        self.batch: int | None = None
        self.action: Any = None

    def arm(self, batch: int | None, action: Any) -> None:
        self.batch, self.action = batch, action

    @hookimpl
    def on_step(self, step: Any) -> None:
        if self.batch is not None and step.context.batch_index == self.batch and step.step == 1:
            self.action(step)


def raise_(error: BaseException) -> Any:
    def action(step: Any) -> None:
        raise error

    return action


@pytest.fixture(scope="module")
def shared_trouble() -> Trouble:
    return Trouble()


@pytest.fixture
def trouble(shared_trouble):
    """The engine's :class:`Trouble` plugin, disarmed again after each test."""
    yield shared_trouble
    shared_trouble.arm(None, None)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, shared_trouble):
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[], extra=[shared_trouble]))
    engine.models.add("tiny", bundle_from(sd_components(tmp_path_factory.mktemp("tokenizer"))))
    return engine


@pytest.fixture(scope="module")
def expected(engine):
    """The whole request's images and infotexts when nothing goes wrong."""
    result = engine.generate(REQUEST)
    assert result.seeds == SEEDS
    return result


def pixels(image_or_path: Any) -> np.ndarray:
    if isinstance(image_or_path, Image.Image):
        return np.asarray(image_or_path.convert("RGB"))
    with Image.open(image_or_path) as image:
        return np.asarray(image.convert("RGB"))


def assert_saved_as_expected(folder: Path, expected: Any, count: int, *, first: int = 0) -> list[Path]:
    """``folder`` holds exactly the request's first ``count`` images, named from counter ``first``,
    with the pixels and infotext of an undisturbed run, and no half-written file."""
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"{first + k:05d}-{SEEDS[k]}.png" for k in range(count)]
    for k, path in enumerate(files):
        assert read_png_parameters(path) == expected.infotexts[k]
        assert np.array_equal(pixels(path), pixels(expected.images[k].image))
    return files


def today(root: Path, task: str = "txt2img") -> Path:
    return output_dir(root, task)


# -- the web app's service ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("the device fell over"), "generation failed: RuntimeError: the device fell over"),
        (GenerationError("the VAE decoded to NaN"), "the VAE decoded to NaN"),
    ],
)
def test_a_failing_later_batch_keeps_the_finished_ones(engine, expected, trouble, tmp_path, error, shown):
    service = StudioService(engine, tmp_path / "outputs")
    trouble.arm(1, raise_(error))
    events = service.run(REQUEST, "alice")
    with pytest.raises(GenerationFailed) as failure:
        for _ in events:
            pass
    folder = today(tmp_path / "outputs")
    assert str(failure.value) == (
        f"{shown} (2 images of the finished batches were saved to outputs/txt2img/{folder.name})"
    )
    assert failure.value.__cause__ is error
    assert_saved_as_expected(folder, expected, 2)
    assert not service.busy("alice")


def test_a_failure_before_any_batch_finished_is_reported_as_it_was(engine, trouble, tmp_path):
    service = StudioService(engine, tmp_path / "outputs")
    error = RuntimeError("broke in batch 1")
    trouble.arm(0, raise_(error))
    with pytest.raises(RuntimeError) as failure:
        list(service.run(REQUEST, "bob"))
    assert failure.value is error
    assert not today(tmp_path / "outputs").exists()


def test_each_batch_is_on_disk_before_the_next_starts_and_when_the_client_leaves(
    engine, expected, trouble, tmp_path
):
    service = StudioService(engine, tmp_path / "outputs")
    folder = today(tmp_path / "outputs")
    gate = threading.Event()
    trouble.arm(1, lambda step: gate.wait(timeout=120))  # batch 2 holds after its first step
    events = service.run(REQUEST.replace(batch_count=3), "carol")
    try:
        for event in events:
            assert isinstance(event, Progress)
            if event.batch == 2:
                break
        # batch 1 is on disk while batch 2 runs, not at the end of the request
        assert_saved_as_expected(folder, expected, 2)
    finally:
        gate.set()
    events.close()  # the browser went away: the generation stops within a step
    assert not service.busy("carol")
    names = sorted(p.name for p in folder.iterdir())
    # batch 2 stopped early (its partly denoised images are kept, as A1111 does); batch 3 never ran
    assert names[:2] == ["00000-40.png", "00001-41.png"] and set(names[2:]) <= {
        "00002-42.png",
        "00003-43.png",
    }


def test_an_interrupt_after_the_first_batch_keeps_its_files(engine, expected, trouble, tmp_path):
    service = StudioService(engine, tmp_path / "outputs")
    trouble.arm(1, lambda step: service.interrupt("dave"))  # as if the Interrupt button were pressed
    finished = list(service.run(REQUEST, "dave"))[-1]
    assert isinstance(finished, Finished) and finished.interrupted and finished.warning is None
    folder = today(tmp_path / "outputs")
    files = sorted(folder.iterdir())
    # batch 2 stopped after its first step (its partly denoised images are kept, as A1111 does)
    assert [p.name for p in files] == ["00000-40.png", "00001-41.png", "00002-42.png", "00003-43.png"]
    for k, path in enumerate(files[:2]):  # batch 1 exactly as an undisturbed run makes it
        assert read_png_parameters(path) == expected.infotexts[k]
        assert np.array_equal(pixels(path), pixels(expected.images[k].image))
    assert [path for path, _ in finished.files] == [str(p) for p in files]
    assert finished.seeds == SEEDS


def test_names_stay_contiguous_across_batches(engine, expected, tmp_path):
    folder = today(tmp_path / "outputs")
    folder.mkdir(parents=True)
    (folder / "00006-7.png").write_bytes(b"an older image")
    service = StudioService(engine, tmp_path / "outputs")
    finished = list(service.run(REQUEST, "erin"))[-1]
    assert isinstance(finished, Finished) and finished.warning is None
    names = [Path(path).name for path, _ in finished.files]
    assert names == [f"{7 + k:05d}-{seed}.png" for k, seed in enumerate(SEEDS)]
    assert [caption for _, caption in finished.files] == [f"seed {s}" for s in SEEDS]
    assert finished.infotexts == expected.infotexts
    for (path, _), item in zip(finished.files, expected.images, strict=True):
        assert read_png_parameters(path) == item.parameters["infotext"]
        assert np.array_equal(pixels(path), pixels(item.image))


def test_an_unwritable_outputs_folder_still_returns_the_images(engine, expected, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the outputs folder's parent should be")
    service = StudioService(engine, blocker / "outputs")
    finished = list(service.run(REQUEST, "frank"))[-1]
    assert isinstance(finished, Finished)
    day = today(blocker / "outputs").name
    assert finished.warning == f"4 images could not be saved to outputs/txt2img/{day}: Not a directory"
    assert str(tmp_path) not in finished.warning
    assert [caption for _, caption in finished.files] == [f"seed {s}" for s in SEEDS]
    for (image, _), item in zip(finished.files, expected.images, strict=True):
        assert isinstance(image, Image.Image)  # the gallery shows the image itself
        assert np.array_equal(pixels(image), pixels(item.image))
    assert finished.infotexts == expected.infotexts
    assert blocker.read_text().startswith("a file")


def test_a_disk_that_fills_up_midway_keeps_what_was_saved_and_returns_the_rest(
    engine, expected, tmp_path, monkeypatch
):
    real_save = output.save_png
    calls = []

    def save_png(image: Any, directory: Any, **kwargs: Any) -> Path:
        calls.append(kwargs["seed"])
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / ".saving-x1y2.png"))
        return real_save(image, directory, **kwargs)

    monkeypatch.setattr(output, "save_png", save_png)
    service = StudioService(engine, tmp_path / "outputs")
    finished = list(service.run(REQUEST, "grace"))[-1]
    folder = today(tmp_path / "outputs")
    assert finished.warning == (
        f"1 of 4 images could not be saved to outputs/txt2img/{folder.name}: No space left on device"
    )
    assert calls == SEEDS  # every image was tried
    assert_saved_as_expected(folder, expected, 3)
    assert [type(entry) for entry, _ in finished.files] == [str] * 3 + [Image.Image]
    assert np.array_equal(pixels(finished.files[3][0]), pixels(expected.images[3].image))


# -- the saver and the writability check --------------------------------------------------------


class Item:
    def __init__(self, seed: int) -> None:
        self.image = Image.new("RGB", (8, 8), (seed, 0, 0))
        self.seed = seed
        self.parameters = {"infotext": f"x\nSteps: 1, Seed: {seed}"}


def test_the_savers_messages(tmp_path):
    saver = BatchSaver(tmp_path / "out", shown_as="out")
    assert saver.summary() is None and saver.warning() is None
    saver([Item(1)])
    assert saver.summary() == "1 image of the finished batches was saved to out" and saver.warning() is None
    first = saver.items[0][0]
    saver.finish([first, Item(2)])  # the first was saved already: only the new one is
    assert [p.name for p in saver.saved] == ["00000-1.png", "00001-2.png"]
    assert read_png_parameters(saver.saved[1]) == "x\nSteps: 1, Seed: 2"

    (tmp_path / "file").write_text("")
    broken = BatchSaver(tmp_path / "file" / "out", shown_as="file/out")
    broken([Item(3), Item(4)])
    assert broken.warning() == "2 images could not be saved to file/out: Not a directory"
    assert (
        broken.summary() == "the finished batches' 2 images could not be saved to file/out: Not a directory"
    )
    printed: list[Path] = []
    mixed = BatchSaver(tmp_path / "out", report=printed.append)
    mixed([Item(5)])
    mixed.directory = tmp_path / "file" / "out"
    mixed([Item(6)])
    assert printed == [tmp_path / "out" / "00002-5.png"]
    assert mixed.summary() == (
        f"1 of the finished batches' 2 images saved to {tmp_path / 'out'}; "
        "1 could not be saved: Not a directory"
    )


def test_check_writable(tmp_path):
    assert check_writable(tmp_path) is None
    assert check_writable(tmp_path / "new" / "deeper") is None  # created when the first image is saved
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    assert check_writable(file) == f"{file} is not a writable folder (it is a file)"
    assert (
        check_writable(file / "out" / "x")
        == f"{file / 'out' / 'x'} is not a writable folder ({file} is a file)"
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_sees_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert check_writable(locked / "out") == (
            f"{locked / 'out'} is not a writable folder (no permission to write in {locked})"
        )
    finally:
        locked.chmod(0o755)


# -- the command line ---------------------------------------------------------------------------


CLI_ARGS = [
    "generate",
    "--prompt",
    "a red circle",
    "--seed",
    "40",
    "--steps",
    "2",
    "--width",
    "64",
    "--height",
    "64",
    "--batch-size",
    "1",
    "--batch-count",
    "2",
    "--sampler",
    "Euler",
    "--cfg-scale",
    "1",
]


@pytest.fixture
def cli_trouble(monkeypatch, trouble):
    """The CLI's engine with the :class:`Trouble` plugin registered."""
    real_engine = cli._engine

    def engine(args: Any, **kwargs: Any) -> Any:
        built = real_engine(args, **kwargs)
        built.plugins.register(trouble, name="trouble")
        return built

    monkeypatch.setattr(cli, "_engine", engine)
    return trouble


def run_cli(capsys, *args: Any) -> tuple[int, list[str], list[str]]:
    code = cli.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_cli_keeps_the_finished_batches_when_a_later_one_fails(tiny_model_dir, tmp_path, capsys, cli_trouble):
    code, printed, _ = run_cli(
        capsys, *CLI_ARGS, "--batch-count", "1", "--model", tiny_model_dir, "--out", tmp_path / "whole"
    )
    assert code == 0 and len(printed) == 1
    cli_trouble.arm(1, raise_(GenerationError("the VAE decoded to NaN")))
    out = tmp_path / "out"
    code, printed, errors = run_cli(capsys, *CLI_ARGS, "--model", tiny_model_dir, "--out", out)
    folder = today(out)
    assert code == 2
    assert errors == [
        f"error: the VAE decoded to NaN (1 image of the finished batches was saved to {folder})"
    ]
    assert printed == [str(folder / "00000-40.png")]
    assert [p.name for p in folder.iterdir()] == ["00000-40.png"]
    whole = today(tmp_path / "whole") / "00000-40.png"  # the same first batch, undisturbed
    assert read_png_parameters(folder / "00000-40.png") == read_png_parameters(whole)
    assert np.array_equal(pixels(folder / "00000-40.png"), pixels(whole))


def test_cli_ctrl_c_keeps_the_finished_batches(tiny_model_dir, tmp_path, capsys, cli_trouble):
    cli_trouble.arm(1, raise_(KeyboardInterrupt()))
    out = tmp_path / "out"
    code, printed, errors = run_cli(capsys, *CLI_ARGS, "--model", tiny_model_dir, "--out", out)
    folder = today(out)
    assert code == 130
    assert errors == [f"1 image of the finished batches was saved to {folder}", "interrupted"]
    assert printed == [str(folder / "00000-40.png")]
    assert all(Path(p).is_file() for p in printed)


def test_cli_reports_images_it_could_not_save(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def full_disk(image: Any, directory: Any, **kwargs: Any) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / ".saving-abc.png"))

    monkeypatch.setattr(output, "save_png", full_disk)
    out = tmp_path / "out"
    code, printed, errors = run_cli(
        capsys, *CLI_ARGS, "--batch-count", "1", "--batch-size", "2", "--model", tiny_model_dir, "--out", out
    )
    assert code == 2 and printed == []
    assert errors == [f"error: 2 images could not be saved to {today(out)}: No space left on device"]


@pytest.mark.parametrize("below", [False, True])
def test_cli_refuses_an_out_that_is_a_file_before_loading_a_model(tmp_path, capsys, monkeypatch, below):
    def no_engine(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an engine was built")

    monkeypatch.setattr(cli, "_engine", no_engine)
    file = tmp_path / "picture.png"
    file.write_bytes(b"not a folder")
    out = file / "more" if below else file
    where = "it" if not below else str(file)
    code, printed, errors = run_cli(capsys, *CLI_ARGS, "--model", tmp_path / "no-such-model", "--out", out)
    assert code == 2 and printed == []
    assert errors == [f"error: --out {out} is not a writable folder ({where} is a file)"]
    assert file.read_bytes() == b"not a folder"


@pytest.mark.slow
def test_a_process_that_dies_in_batch_2_leaves_batch_1_on_disk(tiny_model_dir, tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(
        textwrap.dedent(f"""
        import os
        import sys

        sys.path.insert(0, {str(REPO_ROOT)!r})
        import webui.cli as cli
        from webui.api import hookimpl

        class Dies:
            @hookimpl
            def on_step(self, step):
                if step.context.batch_index == 1:
                    os._exit(3)  # no clean-up, no flushing: as if the process were killed

        real_engine = cli._engine

        def engine(args, **kwargs):
            built = real_engine(args, **kwargs)
            built.plugins.register(Dies(), name="dies")
            return built

        cli._engine = engine
        sys.exit(cli.main(sys.argv[1:]))
    """)
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, str(script), *CLI_ARGS, "--model", str(tiny_model_dir), "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert process.returncode == 3, process.stderr
    folder = today(out)
    assert process.stdout.splitlines() == [str(folder / "00000-40.png")]
    assert [p.name for p in folder.iterdir()] == ["00000-40.png"]  # complete, no temporary file left
    assert "Seed: 40," in read_png_parameters(folder / "00000-40.png")
    with Image.open(folder / "00000-40.png") as image:
        assert image.size == (64, 64)
