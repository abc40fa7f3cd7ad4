"""The Kubernetes manifests in deploy/ hold together with the code they run: every YAML parses, the
kinds are KubeRay's and Kubernetes', GPU workers ask for GPUs, the images and ``rayVersion`` are the
Ray that webui/serve/options.py pins, every pod mounts the models at the same path, the RayService
runs an application that exists under the names the web app looks for, and deploy/README.md names
every file. No Ray, no cluster: the files are read as data."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from webui.serve.options import APP, RAY_REQUIREMENT
from webui.serve.replica import DEPLOYMENT

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MODELS_CLAIM = "latent-studio-models"
MODELS_PATH = "/models"
# an image of ours: <name>:<latent-studio version>-ray<ray version>-py<python>-gpu (deploy/Dockerfile)
OUR_IMAGE = re.compile(r":[^:/]+-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-gpu$")
BASE_IMAGE = re.compile(r"^ARG RAY_IMAGE=rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-gpu$", re.M)
KINDS = {"RayCluster": "ray.io/v1", "RayService": "ray.io/v1", "PersistentVolumeClaim": "v1"}
# the keys a Ray Serve deployment and its autoscaling take (a misspelt one would be refused)
DEPLOYMENT_KEYS = {
    "name",
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "autoscaling_config",
    "ray_actor_options",
    "max_replicas_per_node",
    "user_config",
    "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "placement_group_bundles",
    "placement_group_strategy",
    "logging_config",
}
AUTOSCALING_KEYS = {
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "metrics_interval_s",
    "look_back_period_s",
    "upscaling_factor",
    "downscaling_factor",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml")):
        with path.open(encoding="utf-8") as file:
            found += [(path.name, doc) for doc in yaml.safe_load_all(file) if doc is not None]
    return found


def clusters() -> list[tuple[str, dict[str, Any]]]:
    """Each Ray cluster spec: a RayCluster's spec, a RayService's rayClusterConfig."""
    specs = []
    for name, doc in documents():
        if doc["kind"] == "RayCluster":
            specs.append((name, doc["spec"]))
        elif doc["kind"] == "RayService":
            specs.append((name, doc["spec"]["rayClusterConfig"]))
    return specs


def groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay starts Ray in the first one


def ray_service() -> dict[str, Any]:
    services = [doc for _, doc in documents() if doc["kind"] == "RayService"]
    assert len(services) == 1
    return services[0]


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])  # a YAML document in a string


def pinned() -> Requirement:
    return Requirement(RAY_REQUIREMENT)


def test_every_yaml_parses_with_known_kinds_and_api_versions():
    docs = documents()
    kinds = [doc["kind"] for _, doc in docs]
    assert {"RayCluster", "RayService"} <= set(kinds)
    for name, doc in docs:
        assert doc["kind"] in KINDS, (name, doc["kind"])
        assert doc["apiVersion"] == KINDS[doc["kind"]], (name, doc["apiVersion"])
        assert doc["metadata"]["name"], name


def test_gpu_workers_ask_for_gpus_and_the_autoscaler_may_add_them():
    for name, spec in clusters():
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            resources = ray_container(group)["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, (name, group["groupName"])
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        head = ray_container(spec["headGroupSpec"])
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), name
        ports = {port["name"]: port["containerPort"] for port in head["ports"]}
        assert ports["client"] == 10001 and ports["dashboard"] == 8265 and ports["web"] == 7860, name


def test_images_and_ray_version_are_the_pinned_ray():
    requirement = pinned()
    assert requirement.name == "ray" and "serve" in requirement.extras
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    base = BASE_IMAGE.search(dockerfile)
    assert base is not None, "deploy/Dockerfile: ARG RAY_IMAGE=rayproject/ray:X.Y.Z-pyNNN-gpu"
    assert Version(base["ray"]) in requirement.specifier, (base["ray"], RAY_REQUIREMENT)
    assert Version(f"3.{base['py'][1:]}") >= Version("3.10")  # pyproject's requires-python
    for name, spec in clusters():
        assert spec["rayVersion"] == base["ray"], name
        for group in groups(spec):
            image = ray_container(group)["image"]
            tag = OUR_IMAGE.search(image)
            assert tag is not None, (name, image)
            assert (tag["ray"], tag["py"]) == (base["ray"], base["py"]), (name, image)


def test_every_pod_mounts_the_models_read_only_at_the_same_path():
    for name, spec in clusters():
        for group in groups(spec):
            pod = group["template"]["spec"]
            claims = {
                volume["name"]: volume["persistentVolumeClaim"]
                for volume in pod["volumes"]
                if "persistentVolumeClaim" in volume
            }
            mounts = [
                mount
                for mount in ray_container(group)["volumeMounts"]
                if claims.get(mount["name"], {}).get("claimName") == MODELS_CLAIM
            ]
            assert len(mounts) == 1, name
            assert mounts[0]["mountPath"] == MODELS_PATH and mounts[0]["readOnly"] is True, name
    claims = [doc for _, doc in documents() if doc["kind"] == "PersistentVolumeClaim"]
    assert MODELS_CLAIM in {doc["metadata"]["name"] for doc in claims}


def test_ray_start_params_are_strings_with_an_object_store_size():
    for name, spec in clusters():
        for group in groups(spec):
            params = group["rayStartParams"]
            assert all(isinstance(value, str) for value in params.values()), (name, params)
            assert int(params["object-store-memory"]) >= 256 * 2**20, name  # bytes


def test_the_serve_config_names_the_application_and_deployment_the_code_uses():
    (application,) = serve_config()["applications"]
    assert application["name"] == APP
    assert application["runtime_env"]["env_vars"]["LATENT_STUDIO_MODELS_DIR"] == MODELS_PATH
    assert all(isinstance(value, str) for value in application["runtime_env"]["env_vars"].values())
    (deployment,) = application["deployments"]
    assert deployment["name"] == DEPLOYMENT
    assert set(deployment) <= DEPLOYMENT_KEYS, set(deployment) - DEPLOYMENT_KEYS
    assert set(deployment["autoscaling_config"]) <= AUTOSCALING_KEYS
    assert "num_replicas" not in deployment  # autoscaling_config sets the count instead
    assert deployment["max_ongoing_requests"] == 1
    scale = deployment["autoscaling_config"]
    gpu_pods = sum(
        group["maxReplicas"] * int(ray_container(group)["resources"]["limits"]["nvidia.com/gpu"])
        for group in ray_service()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    )
    assert 0 <= scale["min_replicas"] <= scale["max_replicas"]
    assert scale["max_replicas"] * deployment["ray_actor_options"]["num_gpus"] <= gpu_pods


def test_the_serve_config_imports_an_application_that_exists():
    """``webui.serve.app:app``: the module's file and a top-level ``app`` in it (read, not imported:
    importing it builds the deployment, which needs Ray)."""
    (application,) = serve_config()["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert module and attribute, application["import_path"]
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        pytest.fail(f"{application['import_path']}: {path.relative_to(ROOT)} does not exist")
    source = path.read_text(encoding="utf-8")
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    assert attribute in names, f"{path.relative_to(ROOT)} defines no top-level {attribute!r}"
    for variable in application["runtime_env"]["env_vars"]:
        assert variable in source, f"{path.relative_to(ROOT)} does not read {variable}"


def test_the_readme_names_every_file_in_deploy():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = [
        path.relative_to(DEPLOY).as_posix()
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts
    ]
    assert files
    missing = [name for name in files if name not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"
