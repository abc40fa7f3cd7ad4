"""The approximations benchmark runs end to end on a scaled-down SD 1.5 and on the shipped model (the
full-size run is by hand; its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_approximations", ROOT / "benchmarks" / "bench_approximations.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_run_measures_each_chosen_setting_against_the_exact_image(tmp_path, capsys):
    bench = load_script()
    out_json = tmp_path / "r.json"
    argv = ["--tiny", "--steps", "4", "--device", "cpu", "--json", str(out_json)]
    report = bench.main([*argv, "--settings", "token merging 0.5,DeepCache 2"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    assert rows.count("| exact") == 2 and rows.count("| token merging 0.5") == 2  # one table per model
    assert rows.count("| DeepCache 2") == 2 and "| DeepCache 3" not in rows
    written = json.loads(out_json.read_text())
    assert [r["model"] for r in written["results"]] == ["shapes", "sd15 (tiny)"]
    for result in report["results"]:
        rows = {row["setting"]: row for row in result["rows"]}
        assert list(rows) == ["exact", "token merging 0.5", "DeepCache 2"]
        assert math.isinf(rows["exact"]["psnr_db"]) and rows["exact"]["speedup"] == 1.0
        for name in ("token merging 0.5", "DeepCache 2"):  # an approximation: close, not equal
            assert 10 < rows[name]["psnr_db"] < math.inf and rows[name]["s_per_image"] > 0
        assert "Token merging ratio: 0.5" in rows["token merging 0.5"]["infotext"]
        assert "DeepCache interval: 2" in rows["DeepCache 2"]["infotext"]
    with pytest.raises(SystemExit):
        bench.main([*argv, "--settings", "token merging 2"])
    assert "unknown setting 'token merging 2'" in capsys.readouterr().err
