"""Tests of atomic, never-overwriting PNG saving."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path

import pytest
from PIL import Image

from webui.metadata import format_infotext, parse_infotext, read_png_parameters
from webui.output import next_counter, output_dir, save_png


def _image(seed: int, size: tuple[int, int] = (16, 12)) -> Image.Image:
    """A small deterministic test picture that differs per seed."""
    image = Image.new("RGB", size)
    image.putdata(
        [
            ((x * 13 + seed) % 256, (y * 29 + seed * 7) % 256, (x * y + seed) % 256)
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
    return image


def _infotext(seed: int) -> str:
    return format_infotext(
        "a red fox", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": seed}
    )


def test_output_dir() -> None:
    when = datetime.date(2024, 3, 9)
    assert output_dir("/out", "txt2img", when) == Path("/out/txt2img/2024-03-09")
    assert output_dir(Path("rel"), "inpaint", datetime.datetime(2025, 12, 31, 23, 59)) == Path(
        "rel/inpaint/2025-12-31"
    )
    assert output_dir("/out", "img2img") == Path("/out/img2img") / datetime.date.today().isoformat()


@pytest.mark.parametrize("task", ["", ".", "..", "a/b", "a\\b"])
def test_output_dir_rejects_bad_task(task: str) -> None:
    with pytest.raises(ValueError):
        output_dir("/out", task)


def test_creates_directory_and_counter_increments(tmp_path: Path) -> None:
    target = tmp_path / "outputs" / "txt2img" / "2024-01-01"
    first = save_png(_image(1), target, seed=1, infotext=_infotext(1))
    second = save_png(_image(2), target, seed=42, infotext=_infotext(42))
    third = save_png(_image(3), target, seed=42, infotext=None)
    assert [p.name for p in (first, second, third)] == ["00000-1.png", "00001-42.png", "00002-42.png"]
    assert sorted(p.name for p in target.iterdir()) == ["00000-1.png", "00001-42.png", "00002-42.png"]
    assert next_counter(target) == 3


def test_never_overwrites_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "00005-1.png"
    existing.write_bytes(b"do not touch")
    (tmp_path / "notes.txt").write_text("unrelated")
    path = save_png(_image(7), tmp_path, seed=1, infotext=_infotext(1))
    assert path.name == "00006-1.png"
    assert existing.read_bytes() == b"do not touch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00005-1.png", "00006-1.png", "notes.txt"]


def test_name_collision_moves_to_next_counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file appearing at the chosen name after the scan is skipped, not overwritten."""
    import webui.output as output

    taken = tmp_path / "00000-3.png"
    real_next_counter = output.next_counter
    calls = {"n": 0}

    def racing_next_counter(directory: str | Path) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            taken.write_bytes(b"someone else")
            return 0
        return real_next_counter(directory)

    monkeypatch.setattr(output, "next_counter", racing_next_counter)
    path = save_png(_image(3), tmp_path, seed=3, infotext=None)
    assert path.name == "00001-3.png"
    assert taken.read_bytes() == b"someone else"


def test_fallback_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "00000-9.png").write_bytes(b"keep")
    path = save_png(_image(9), tmp_path, seed=9, infotext=_infotext(9))
    assert path.name == "00001-9.png"
    assert (tmp_path / "00000-9.png").read_bytes() == b"keep"
    assert read_png_parameters(path) == _infotext(9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-9.png", "00001-9.png"]


def test_metadata_and_pixels_read_back(tmp_path: Path) -> None:
    image = _image(11)
    text = _infotext(11)
    path = save_png(image, tmp_path, seed=11, infotext=text)
    assert read_png_parameters(path) == text
    assert parse_infotext(read_png_parameters(path) or "")["Seed"] == "11"
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.mode == "RGB"
        assert saved.size == image.size
        assert saved.tobytes() == image.tobytes()


def test_non_latin1_infotext_uses_itxt(tmp_path: Path) -> None:
    text = format_infotext("猫 in a café ☕", "", {"Steps": 1, "Seed": 2, "CFG scale": 3})
    path = save_png(_image(2), tmp_path, seed=2, infotext=text)
    assert b"iTXt" in path.read_bytes()
    assert read_png_parameters(path) == text


def test_latin1_infotext_uses_text_chunk(tmp_path: Path) -> None:
    path = save_png(_image(2), tmp_path, seed=2, infotext="café\nSteps: 1, Seed: 2, CFG scale: 3")
    data = path.read_bytes()
    assert b"tEXtparameters" in data
    assert read_png_parameters(path) == "café\nSteps: 1, Seed: 2, CFG scale: 3"


def test_no_infotext_means_no_chunk(tmp_path: Path) -> None:
    path = save_png(_image(4), tmp_path, seed=4, infotext=None)
    assert read_png_parameters(path) is None


def test_rgba_and_unusual_modes(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 128))
    with Image.open(save_png(rgba, tmp_path, seed=1, infotext=None)) as saved:
        assert saved.mode == "RGBA"
        assert saved.getpixel((0, 0)) == (1, 2, 3, 128)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    with Image.open(save_png(cmyk, tmp_path, seed=2, infotext=None)) as saved:
        assert saved.mode == "RGB"


def test_concurrent_saves_are_distinct(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    seeds = list(range(100, 108))
    results: dict[int, Path] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def worker(seed: int) -> None:
        try:
            barrier.wait()
            results[seed] = save_png(_image(seed), target, seed=seed, infotext=_infotext(seed))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    paths = list(results.values())
    assert len(set(paths)) == len(seeds)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths)
    counters = sorted(int(p.name.split("-")[0]) for p in paths)
    assert counters == list(range(len(seeds)))
    for seed, path in results.items():
        assert path.name.endswith(f"-{seed}.png")
        assert parse_infotext(read_png_parameters(path) or "")["Seed"] == str(seed)
        with Image.open(path) as saved:
            assert saved.tobytes() == _image(seed).tobytes()


@pytest.mark.slow
def test_concurrent_processes_never_collide(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "from PIL import Image\n"
        "from webui.output import save_png\n"
        "base = int(sys.argv[2])\n"
        "for k in range(5):\n"
        "    save_png(Image.new('RGB', (8, 8), (base, k, 0)), sys.argv[1], seed=base + k, infotext=f'p\\nSteps: 1, Seed: {base + k}, CFG scale: 7')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(100 * i)], cwd=repo)
        for i in range(1, 5)
    ]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0, 0, 0]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 20
    assert sorted(int(name.split("-")[0]) for name in names) == list(range(20))
    for name in names:
        seed = name.removesuffix(".png").split("-")[1]
        assert parse_infotext(read_png_parameters(tmp_path / name) or "")["Seed"] == seed
