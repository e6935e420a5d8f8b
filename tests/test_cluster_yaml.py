"""cluster/*.yaml: every shipped file validates clean, and each rule catches a file that differs from a shipped
one by one key, naming that key. No Ray cluster is started: the checks read files only."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from raycls.cluster.validate import check_launcher, validate_launcher
from raycls.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHIPPED = sorted(CLUSTER.glob("*.yaml"))


def shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def variant(tmp_path: Path, name: str, change: Callable[[dict[str, Any]], Any]) -> list[str]:
    """The problems of a shipped file after `change` edited one key of it."""
    doc = copy.deepcopy(shipped(name))
    change(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return validate_launcher(path)


def one_problem_naming(problems: list[str], key: str) -> str:
    assert len(problems) == 1, problems
    assert problems[0].startswith(key), problems
    return problems[0]


def replace_in(commands: list[str], old: str, new: str) -> list[str]:
    assert any(old in c for c in commands), (old, commands)
    return [c.replace(old, new) for c in commands]


# ---------------------------------------------------------------------------------------- shipped files
def test_the_four_cluster_files_ship() -> None:
    assert {p.name for p in SHIPPED} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml", "kuberay.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_cluster_file_validates_clean(path: Path) -> None:
    assert validate_launcher(path) == []
    check_launcher(path)  # does not raise


@pytest.mark.parametrize("path", [p for p in SHIPPED if "provider" in shipped(p.name)], ids=lambda p: p.name)
def test_launcher_files_keep_the_dashboard_local_and_install_raycls(path: Path) -> None:
    doc = shipped(path.name)
    assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])
    assert any("raycls @" in c for c in doc["setup_commands"])
    assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    header = path.read_text().split("\n\n")[0]
    for step in ("ray up cluster/", "ray dashboard", "ray job submit", "ray down cluster/", "estimates as of 2026"):
        assert step in header, step


# ------------------------------------------------------------------------------------ reading the file
def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken-cluster.yaml"
    path.write_text("provider:\n  type: aws\n  region: [us-west-2\n")
    problems = validate_launcher(path)
    assert len(problems) == 1 and "broken-cluster.yaml" in problems[0] and "not valid YAML" in problems[0]
    with pytest.raises(ConfigError) as caught:
        check_launcher(path)
    assert caught.value.source == str(path) and "broken-cluster.yaml" in str(caught.value)


@pytest.mark.parametrize("text", ["- provider\n- aws\n", "just text\n", ""])
def test_a_file_that_is_not_a_mapping_is_one_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    (problem,) = validate_launcher(path)
    assert "list.yaml must be a mapping" in problem


def test_neither_launcher_nor_kuberay(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("experiment: {name: x}\n")
    (problem,) = validate_launcher(path)
    assert "neither a Ray cluster launcher YAML" in problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_launcher(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------------- Ray's schema
def test_ray_schema_catches_an_unknown_top_level_key(tmp_path: Path) -> None:
    problems = variant(tmp_path, "aws-gpu.yaml", lambda d: d.update(max_worker=3))
    assert "max_worker" in one_problem_naming(problems, "(top level)")


def test_ray_schema_catches_a_wrong_type(tmp_path: Path) -> None:
    problems = variant(tmp_path, "gcp-gpu.yaml", lambda d: d.update(max_workers="ten"))
    assert "is not of type 'integer'" in one_problem_naming(problems, "max_workers:")


def test_ray_schema_errors_carry_the_nested_key(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["available_node_types"]["gpu_1x"]["resources"]["GPU"] = "one"

    one_problem_naming(variant(tmp_path, "aws-gpu.yaml", change), "available_node_types.gpu_1x.resources.GPU:")


def test_head_node_type_must_be_a_node_type(tmp_path: Path) -> None:
    problems = variant(tmp_path, "aws-gpu.yaml", lambda d: d.update(head_node_type="ray.head.default"))
    assert "gpu_1x" in one_problem_naming(problems, "head_node_type:")


# ------------------------------------------------------------------------------------------ storage
def test_storage_missing_on_a_multi_node_cluster(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = [c for c in doc["setup_commands"] if "RAYCLS_STORAGE" not in c]

    assert "RAYCLS_STORAGE" in one_problem_naming(variant(tmp_path, "aws-gpu.yaml", change), "setup_commands:")


def test_storage_on_a_local_disk_of_a_cloud_cluster(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = replace_in(doc["setup_commands"], "gs://YOUR_BUCKET/raycls", "/home/ubuntu/results")

    problem = one_problem_naming(variant(tmp_path, "gcp-gpu.yaml", change), "setup_commands:")
    assert "/home/ubuntu/results is not shared" in problem


def test_onprem_storage_outside_the_nfs_mount(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = replace_in(doc["setup_commands"], "=/mnt/raycls/results", "=/data/results")

    problem = one_problem_naming(variant(tmp_path, "onprem.yaml", change), "setup_commands:")
    assert "NFS" in problem


def test_onprem_mount_that_is_not_nfs_does_not_share(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = replace_in(doc["setup_commands"], "mount -t nfs4", "mount -t ext4")

    one_problem_naming(variant(tmp_path, "onprem.yaml", change), "setup_commands:")


def test_single_node_clusters_may_keep_local_storage(tmp_path: Path) -> None:
    def onprem(doc: dict) -> None:
        doc["provider"]["worker_ips"] = []
        doc["worker_start_ray_commands"] = []  # no worker ever starts Ray: nothing to authenticate
        doc["setup_commands"] = replace_in(doc["setup_commands"], "=/mnt/raycls/results", "=/data/results")

    def aws(doc: dict) -> None:
        doc["max_workers"] = 0
        doc["setup_commands"] = [c for c in doc["setup_commands"] if "RAYCLS_STORAGE" not in c]

    assert variant(tmp_path, "onprem.yaml", onprem) == []
    assert variant(tmp_path, "aws-gpu.yaml", aws) == []


def test_kuberay_storage(tmp_path: Path) -> None:
    def local(doc: dict) -> None:
        env = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == "RAYCLS_STORAGE")["value"] = "/tmp/results"

    key = "spec.headGroupSpec.template.spec.containers.0.env.RAYCLS_STORAGE:"
    assert "/tmp/results is not shared" in one_problem_naming(variant(tmp_path, "kuberay.yaml", local), key)


# --------------------------------------------------------------------------------------------- GPUs
def test_aws_gpu_instance_without_gpu_resource(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["available_node_types"]["gpu_4x"]["resources"] = {}

    one_problem_naming(variant(tmp_path, "aws-gpu.yaml", change), "available_node_types.gpu_4x.resources:")


def test_gcp_gpu_count_must_match_the_accelerators(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["available_node_types"]["gpu_4x"]["resources"]["GPU"] = 2

    problem = one_problem_naming(variant(tmp_path, "gcp-gpu.yaml", change), "available_node_types.gpu_4x.resources:")
    assert "GPU: 4" in problem and "got GPU: 2" in problem


def test_kuberay_gpu_group_without_gpu_limit(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        worker = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        del worker["resources"]["limits"]["nvidia.com/gpu"]

    key = "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits:"
    assert "nvidia.com/gpu" in one_problem_naming(variant(tmp_path, "kuberay.yaml", change), key)


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("spec.headGroupSpec:", lambda d: d["spec"].pop("headGroupSpec")),
        ("apiVersion:", lambda d: d.update(apiVersion="v1")),
        (
            "spec.workerGroupSpecs.0.template.spec.containers:",
            lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"].pop("containers"),
        ),
        ("spec.workerGroupSpecs.0.minReplicas:", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=9)),
    ],
    ids=["no-head", "api-version", "no-containers", "min-over-max"],
)
def test_kuberay_structure(tmp_path: Path, key: str, change: Callable[[dict], Any]) -> None:
    one_problem_naming(variant(tmp_path, "kuberay.yaml", change), key)


# ---------------------------------------------------------------------------------------- dashboard
@pytest.mark.parametrize("flag", ["--dashboard-host=0.0.0.0", "--dashboard-host 0.0.0.0"])
@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"])
def test_dashboard_open_to_the_network(tmp_path: Path, name: str, flag: str) -> None:
    def change(doc: dict) -> None:
        doc["head_start_ray_commands"] = replace_in(doc["head_start_ray_commands"], "--dashboard-host=127.0.0.1", flag)

    one_problem_naming(variant(tmp_path, name, change), "head_start_ray_commands.1:")


def test_left_out_start_commands_fall_back_to_rays_open_default(tmp_path: Path) -> None:
    problems = variant(tmp_path, "aws-gpu.yaml", lambda d: d.pop("head_start_ray_commands"))
    assert any(p.startswith("head_start_ray_commands (left out") and "0.0.0.0" in p for p in problems), problems


@pytest.mark.parametrize(
    ("host", "why"),
    [("0.0.0.0", "opens the dashboard"), (None, "KubeRay then binds 0.0.0.0")],
    ids=["open", "left-out"],
)
def test_kuberay_dashboard(tmp_path: Path, host: str | None, why: str) -> None:
    def change(doc: dict) -> None:
        params = doc["spec"]["headGroupSpec"]["rayStartParams"]
        params.pop("dashboard-host") if host is None else params.update({"dashboard-host": host})

    key = "spec.headGroupSpec.rayStartParams.dashboard-host:"
    assert why in one_problem_naming(variant(tmp_path, "kuberay.yaml", change), key)


# -------------------------------------------------------------------------------------------- auth
def test_workers_started_without_token_auth(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = [c for c in doc["setup_commands"] if "RAY_AUTH_MODE" not in c]
        doc["worker_start_ray_commands"] = replace_in(doc["worker_start_ray_commands"], "RAY_AUTH_MODE=token ", "")

    one_problem_naming(variant(tmp_path, "onprem.yaml", change), "worker_start_ray_commands:")


def test_head_started_without_token_auth(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["setup_commands"] = [c for c in doc["setup_commands"] if "RAY_AUTH_MODE" not in c]
        doc["head_start_ray_commands"] = replace_in(doc["head_start_ray_commands"], "RAY_AUTH_MODE=token ", "")

    one_problem_naming(variant(tmp_path, "gcp-gpu.yaml", change), "head_start_ray_commands:")


def test_kuberay_head_without_token_auth(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        container = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "RAY_AUTH_MODE"]

    one_problem_naming(variant(tmp_path, "kuberay.yaml", change), "spec.headGroupSpec.template.spec.containers.0.env:")


# ----------------------------------------------------------------------------------------- secrets
SECRET_COMMANDS = {
    "aws-access-key": "echo AKIAIOSFODNN7EXAMPLE > ~/.aws/id",
    "aws-secret": "aws configure set aws_secret_access_key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "wandb": "echo 'export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567' >> ~/.bashrc",
    "ray-token": "export RAY_AUTH_TOKEN=5f1a9c2b7e3d4a6b8c0d",
    "private-key": "printf '%s' '-----BEGIN OPENSSH PRIVATE KEY-----' > ~/.ssh/id",
    "gcp-sa-json": 'echo \'{"type": "service_account", "private_key": "x"}\' > sa.json',
}


@pytest.mark.parametrize("command", SECRET_COMMANDS.values(), ids=SECRET_COMMANDS.keys())
def test_inline_secrets_are_refused(tmp_path: Path, command: str) -> None:
    problems = variant(tmp_path, "aws-gpu.yaml", lambda d: d["setup_commands"].append(command))
    index = len(shipped("aws-gpu.yaml")["setup_commands"])
    assert "written in the file" in one_problem_naming(problems, f"setup_commands.{index}:")


@pytest.mark.parametrize(
    "command",
    [
        "echo 'export WANDB_API_KEY=$WANDB_API_KEY' >> ~/.bashrc",
        "export WANDB_API_KEY=${WANDB_API_KEY}",
        "export RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)",
        "export RAY_AUTH_TOKEN_PATH=~/.ray/auth_token",
        "aws configure set aws_secret_access_key $AWS_SECRET_ACCESS_KEY",
    ],
)
def test_references_to_secrets_are_fine(tmp_path: Path, command: str) -> None:
    assert variant(tmp_path, "aws-gpu.yaml", lambda d: d["setup_commands"].append(command)) == []


def test_kuberay_literal_token_in_env(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        env = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
        doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = [
            {"name": "RAY_AUTH_TOKEN", "value": "5f1a9c2b7e3d4a6b"} if e["name"] == "RAY_AUTH_TOKEN" else e for e in env
        ]

    key = "spec.workerGroupSpecs.0.template.spec.containers.0.env.1.value:"
    assert "RAY_AUTH_TOKEN" in one_problem_naming(variant(tmp_path, "kuberay.yaml", change), key)


def test_secret_in_a_mapping_value(tmp_path: Path) -> None:
    problems = variant(tmp_path, "aws-gpu.yaml", lambda d: d.update(metadata={"WANDB_API_KEY": "abcdef0123456789"}))
    one_problem_naming(problems, "metadata.WANDB_API_KEY:")


def test_secret_in_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "aws-gpu.yaml"
    path.write_text((CLUSTER / "aws-gpu.yaml").read_text() + "\n# my key: AKIAIOSFODNN7EXAMPLE\n")
    (problem,) = validate_launcher(path)
    assert problem.startswith("line ") and "(a comment)" in problem and "AWS access key" in problem


def test_check_launcher_lists_every_problem(tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["head_start_ray_commands"] = replace_in(doc["head_start_ray_commands"], "127.0.0.1", "0.0.0.0")
        doc["available_node_types"]["gpu_1x"]["resources"] = {}

    doc = copy.deepcopy(shipped("aws-gpu.yaml"))
    change(doc)
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as caught:
        check_launcher(path)
    assert len(caught.value.problems) == 2 and caught.value.source == str(path)
