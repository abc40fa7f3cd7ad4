"""The --ray flags are checked before anything starts, and without --ray Ray is never imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from webui.cli import build_parser
from webui.errors import InvalidRequestError
from webui.serve.options import autoscale_range, ray_problem


def parse(*args: str):
    return build_parser().parse_args([*args, "models"])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--replicas", "2"), "--replicas need --ray"),
        (("--ray-address", "ray://x:10001", "--autoscale", "1:2"), "--ray-address, --autoscale need --ray"),
        (("--ray", "--replicas", "0"), "--replicas must be at least 1"),
        (("--ray", "--replica-cache", "0"), "--replica-cache must be at least 1"),
        (("--ray", "--autoscale", "4:1"), "need 0 <= MIN <= MAX"),
        (("--ray", "--autoscale", "x" * 100), "takes MIN:MAX"),
    ],
)
def test_bad_ray_flags_are_one_line(args, words):
    problem = ray_problem(parse(*args))
    assert problem is not None and words in problem and "\n" not in problem


def test_autoscale_ranges():
    assert (
        autoscale_range("1:4") == (1, 4)
        and autoscale_range("0:2") == (0, 2)
        and autoscale_range(None) is None
    )
    with pytest.raises(InvalidRequestError):
        autoscale_range("1:")


def test_without_the_flag_ray_is_not_imported():
    code = "import sys; from webui.cli import build_parser; build_parser().parse_args(['models']); print('ray' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
    assert ray_problem(parse()) is None
