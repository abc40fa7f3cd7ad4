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


# -- --ray-config -------------------------------------------------------------------------------

from webui.serve.options import MAX_CONFIG_BYTES, deployment_options, read_ray_config  # noqa: E402

GOOD = """\
# as in a Serve config's deployment entry
autoscaling_config:
  min_replicas: 1
  max_replicas: 6
  target_ongoing_requests: 1
  downscale_delay_s: 600
max_queued_requests: 20
ray_actor_options: {num_cpus: 4, num_gpus: 0.5}
max_replicas_per_node: 2
"""


def test_a_ray_config_file_gives_the_deployment_options(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(GOOD)
    options = deployment_options(
        parse("--ray", "--ray-config", str(path), "--queue-size", "9"), gpus=4, cores=32
    )
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 1,
        "downscale_delay_s": 600,
    }
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0.5}  # the file's, kept
    assert options["max_queued_requests"] == 20 and options["max_replicas_per_node"] == 2
    # the flags win over the file
    fixed = deployment_options(parse("--ray", "--ray-config", str(path), "--replicas", "3"), gpus=4, cores=32)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    ranged = deployment_options(
        parse("--ray", "--ray-config", str(path), "--autoscale", "0:2"), gpus=0, cores=8
    )
    assert ranged["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
    }


def test_without_a_file_replicas_share_the_cores_or_take_a_gpu_each():
    cpu = deployment_options(parse("--ray", "--replicas", "2", "--queue-size", "5"), gpus=0, cores=8)
    assert cpu == {
        "num_replicas": 2,
        "ray_actor_options": {"num_gpus": 0, "num_cpus": 4},
        "max_queued_requests": 5,  # the web app's bound holds in Ray's queue too
    }
    gpu = deployment_options(parse("--ray", "--autoscale", "1:8"), gpus=8, cores=64)
    assert gpu["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    assert deployment_options(parse("--ray"), gpus=0, cores=2)["num_replicas"] == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("num_replicas: 0\n", "num_replicas must be a whole number of at least 1"),
        ("num_replicas: true\n", "num_replicas must be a whole number"),
        ("max_ongoing_requests: 4\n", "unknown setting 'max_ongoing_requests'"),
        ("import_path: os:system\n", "unknown setting 'import_path'"),
        (
            "ray_actor_options: {runtime_env: {pip: [evil]}}\n",
            "unknown setting 'ray_actor_options.runtime_env'",
        ),
        ("ray_actor_options: {num_gpus: -1}\n", "ray_actor_options.num_gpus must be a number of at least 0"),
        ("autoscaling_config: {min_replicas: 3, max_replicas: 1}\n", "min_replicas is above max_replicas"),
        ("autoscaling_config: 4\n", "autoscaling_config must be a mapping"),
        ("num_replicas: 2\nautoscaling_config: {max_replicas: 3}\n", "not both"),
        ("max_queued_requests: -2\n", "or -1 for no bound"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("num_replicas: [\n", "not valid YAML (line 2)"),
        ("a: &a [1]\nb: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
    ],
)
def test_bad_ray_config_files_are_one_line(tmp_path, text, words):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError) as error:
        read_ray_config(path)
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    problem = ray_problem(parse("--ray", "--ray-config", str(path)))
    assert problem is not None and words in problem  # refused before anything starts


def test_hostile_ray_config_files(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("num_replicas: 1\n" + "#" * MAX_CONFIG_BYTES)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"num_replicas: \xff\xfe\n")
    # aliases nest a list a billion items deep if walked naively; read, refused by name, at once
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + n)}: &{chr(98 + n)} [{', '.join(['*' + chr(97 + n)] * 9)}]\n" for n in range(8))
    )
    cases = [
        (huge, "larger than 64 KiB"),
        (binary, "not UTF-8"),
        (laughs, "unknown setting 'a'"),
        (tmp_path / "missing.yaml", "cannot read it"),
        (tmp_path, "cannot read it"),
    ]
    for path, words in cases:
        with pytest.raises(InvalidRequestError) as error:
            read_ray_config(path)
        assert words in str(error.value), (path, str(error.value))
    assert read_ray_config(_write(tmp_path / "empty.yaml", "")) == {}


def _write(path, text):
    path.write_text(text)
    return path


def test_ray_client_addresses_and_contradicting_flags_are_refused(tmp_path):
    problem = ray_problem(parse("--ray", "--ray-address", "ray://head:10001"))
    assert problem is not None and "--ray-address auto" in problem
    config = _write(tmp_path / "serve.yaml", "num_replicas: 2\n")
    problem = ray_problem(parse("--ray", "--ray-deployed", "--ray-config", str(config)))
    assert problem is not None and "--ray-deployed" in problem
    assert ray_problem(parse("--ray-deployed")) == "--ray-deployed need --ray"
