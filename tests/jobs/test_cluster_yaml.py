"""cluster.yaml: valid for Ray's own autoscaler, and shaped the way docs/cluster.md says.

The schema check uses Ray's ``ray-schema.json`` through Ray's own
``validate_config`` / ``prepare_config`` (what ``ray up`` runs), so an upgrade
of Ray that changes the schema makes this test fail instead of the launch.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

import ray  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _gpu_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}


def _check(cfg: dict) -> dict:
    """Ray's checks: the file as written, then with the provider's defaults (as `ray up`)."""
    validate_config(copy.deepcopy(cfg))
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_validates_against_ray_schema(config):
    prepared = _check(config)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # typo'd key
        lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"),
        lambda c: c.pop("provider"),
        lambda c: c.update(setup_commands="pip install raybary"),  # not a list
    ],
    ids=["unknown-key", "bad-resource", "no-provider", "commands-not-list"],
)
def test_schema_check_catches_mistakes(config, mutate):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        _check(bad)


def test_cpu_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head should be a CPU instance"
    gpu = _gpu_types(config)
    assert len(gpu) == 1
    (name, worker), = gpu.items()
    assert worker["min_workers"] == 0, "GPU workers must scale to zero"
    assert 1 <= worker["max_workers"] <= config["max_workers"] <= 64
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))


def test_setup_installs_raybary_with_gpu_jax(config):
    gpu_name = next(iter(_gpu_types(config)))
    worker_cmds = config["available_node_types"][gpu_name].get(
        "worker_setup_commands", config.get("worker_setup_commands", []))
    assert any(re.search(r"raybary\[[^]]*\bgpu\b", c) for c in worker_cmds), worker_cmds
    head_cmds = " ".join(config["setup_commands"] + config["head_setup_commands"])
    assert "raybary" in head_cmds
    # The checkout that is installed is the one mounted from the repository root.
    assert any(local == "." for local in config["file_mounts"].values())
    assert (ROOT / "pyproject.toml").exists()


def test_cluster_ray_matches_local_ray(config):
    """The image tags pin the cluster's Ray; it must be the Ray we test with."""
    for key in ("image", "head_image", "worker_image"):
        image = config["docker"].get(key)
        if image:
            tag = image.split(":", 1)[1]
            assert tag.split("-")[0] == ray.__version__, f"docker.{key}={image} vs ray {ray.__version__}"


def test_token_auth_on_every_node(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_no_credentials_in_file():
    text = CLUSTER_YAML.read_text()
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)
    assert not re.search(r"(?i)(secret|aws_access_key_id|aws_secret_access_key|password)\s*[:=]", active)
