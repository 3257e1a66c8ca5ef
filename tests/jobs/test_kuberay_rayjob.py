"""jobs/kuberay-rayjob.yaml: a valid KubeRay RayJob whose entrypoint is a
`raybary run` that its cluster can carry out, with storage credentials from
Secrets, and the docs/cluster.md commands that go with it.

The schema is KubeRay's own (the RayJob CRD of a release, cut down to what
the manifest uses: tests/jobs/data/kuberay-rayjob-crd.yaml, made by
tests/jobs/crd_excerpt.py), checked as the API server checks it: types,
required fields, enums, patterns, and no unknown fields. With
``RAYBARY_KUBERAY_CRD=/path/to/ray.io_rayjobs.yaml`` the manifest is also
checked against that full CRD, and the excerpt against it.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

import ray  # noqa: E402
from crd_excerpt import excerpt, strict, uncovered, version_schema  # noqa: E402
from docs_blocks import fenced, shell_commands  # noqa: E402

from raybary.cli.run_cmds import run_cmd  # noqa: E402
from raybary.jobs.runtime import DEFAULT_ENV_VARS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "jobs" / "kuberay-rayjob.yaml"
DOCKERFILE = ROOT / "jobs" / "Dockerfile"
EXCERPT = Path(__file__).parent / "data" / "kuberay-rayjob-crd.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def job() -> dict:
    with open(MANIFEST) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def crd() -> dict:
    with open(EXCERPT) as f:
        return yaml.safe_load(f)


def _validate(doc: dict, crd: dict) -> None:
    """What the API server checks of a RayJob: its apiVersion and kind, then the schema."""
    if doc.get("apiVersion") != f"{crd['group']}/{crd['version']}" or doc.get("kind") != crd["kind"]:
        raise jsonschema.ValidationError(f"not a {crd['group']}/{crd['version']} {crd['kind']}: "
                                         f"{doc.get('apiVersion')} {doc.get('kind')}")
    jsonschema.Draft4Validator(strict(crd["openAPIV3Schema"])).validate(doc)


def _run_params(job: dict) -> dict:
    """The entrypoint, parsed by `raybary run`'s own parser."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["raybary", "run"], argv
    with run_cmd.make_context("run", argv[2:]) as ctx:
        return dict(ctx.params)


def _containers(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return {name: g["template"]["spec"]["containers"][0] for name, g in groups.items()}


def _gpu_groups(job: dict) -> list[dict]:
    return [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                   .get("nvidia.com/gpu", 0)) > 0]


# ------------------------------------------------------------------ the schema
def test_validates_against_the_rayjob_crd(job, crd):
    _validate(job, crd)
    assert crd["source"].startswith("https://github.com/ray-project/kuberay/blob/v")
    assert not uncovered(crd["openAPIV3Schema"], job), \
        "fields the CRD excerpt was not made for: regenerate it (tests/jobs/crd_excerpt.py)"


@pytest.mark.parametrize("mutate", [
    lambda j: j["spec"].update(shutdownAfterJobFinish=True),  # typo'd key
    lambda j: j["spec"].update(ttlSecondsAfterFinished="600"),
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
    lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    ["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}),  # rayStartParams are strings
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ["env"][0]["valueFrom"]["secretKeyRef"].pop("key"),
    lambda j: j.update(apiVersion="ray.io/v1alpha2"),
], ids=["unknown-key", "ttl-not-int", "no-head-template", "no-group-name", "bad-auth-mode",
        "bad-quantity", "start-param-not-string", "secret-ref-without-key", "bad-api-version"])
def test_schema_check_catches_mistakes(job, crd, mutate):
    bad = copy.deepcopy(job)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, crd)


@pytest.mark.skipif(not os.environ.get("RAYBARY_KUBERAY_CRD"),
                    reason="set RAYBARY_KUBERAY_CRD to a ray.io_rayjobs.yaml to check the full CRD")
def test_full_crd_and_the_excerpt_agree(job, crd):
    with open(os.environ["RAYBARY_KUBERAY_CRD"]) as f:
        full = yaml.safe_load(f)
    jsonschema.Draft4Validator(strict(version_schema(full, crd["version"]))).validate(job)
    assert excerpt(full, job, "tag")["openAPIV3Schema"] == crd["openAPIV3Schema"], \
        "the excerpt differs from this CRD cut down to the manifest: regenerate it"


def test_operator_rules_beyond_the_schema(job):
    """What KubeRay's operator checks before it creates anything
    (ValidateRayJobSpec / ValidateRayClusterSpec, ray-operator/controllers/ray/
    utils/validation.go of v1.7.0) and the CRD's schema cannot say."""
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["backoffLimit"] >= 0
    assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("preRunningDeadlineSeconds", 1) > 0
    assert not spec.get("suspend") and not spec.get("clusterSelector")
    assert yaml.safe_load(spec["runtimeEnvYAML"]) is not None
    assert not cluster.get("enableInTreeAutoscaling")
    for g in cluster["workerGroupSpecs"]:  # without the autoscaler both bounds are required
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
        assert g["template"]["spec"]["containers"], g["groupName"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    auth = cluster["authOptions"]
    assert not auth.get("enableK8sTokenAuth"), "not supported for a RayJob"
    if auth["mode"] == "token":  # needs Ray 2.52 or later
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)


# ------------------------------------------------------------------ the job
def test_entrypoint_is_a_raybary_run_the_cluster_can_place(job):
    p = _run_params(job)
    assert p["input_url"].startswith("s3://") and p["output_url"].startswith("s3://")
    assert p["address"] == "auto"  # the job's cluster, not a Ray of its own
    assert p["gpus_per_actor"] == 1, "one GPU per actor"
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]
                                   ["limits"]["nvidia.com/gpu"]) for g in _gpu_groups(job))
    assert p["actors"] is not None and p["actors"] * p["gpus_per_actor"] <= gpus, \
        f"{p['actors']} actors of {p['gpus_per_actor']} GPU on {gpus} GPUs"
    # and the CPUs they ask for fit the pods they land on
    for g in _gpu_groups(job):
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = int(limits["nvidia.com/gpu"]) / p["gpus_per_actor"]
        assert per_pod * p["cpus_per_actor"] <= float(limits["cpu"])
    # the metadata `raybary status` shows is this run's
    meta = job["spec"]["metadata"]
    assert (meta["input"], meta["output"]) == (p["input_url"], p["output_url"])
    assert meta["raybary_command"] == "run"


def test_cluster_shape_and_lifetime(job):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no actors on the head"
    assert "nvidia.com/gpu" not in _containers(job)["head"]["resources"]["limits"]
    groups = _gpu_groups(job)
    assert groups and all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                              ["nvidia.com/gpu"]) == 1 for g in groups)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env == {"env_vars": DEFAULT_ENV_VARS}, "keep it equal to jobs/runtime_env.yaml"


def test_token_auth_from_a_secret(job):
    auth = job["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": auth["secretName"]} and auth["secretName"]


def test_storage_credentials_come_from_a_secret_on_every_node(job):
    for name, container in _containers(job).items():
        env = {e["name"]: e for e in container["env"]}
        for key in STORAGE_KEYS:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert "value" not in env[key] and ref["key"] == key and not ref.get("optional"), name
        endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
        assert endpoint["optional"] is True, "S3-compatible endpoint: optional"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for c in _containers(job).values()
               for e in c["env"] if "valueFrom" in e}
    assert len(secrets) == 1


def test_no_credentials_in_file():
    text = MANIFEST.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)
    for doc in yaml.safe_load_all(text):
        for c in _containers(doc).values():
            for e in c.get("env", []):
                if re.search(r"(?i)secret|key|token|password", e["name"]):
                    assert "value" not in e, e["name"]


def test_images_carry_the_tested_ray(job):
    """The image is built from jobs/Dockerfile on Ray's official image of the
    Ray we test with; rayVersion says the same."""
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    images = {c["image"] for c in _containers(job).values()}
    assert len(images) == 1
    (image,) = images
    assert f"ray{ray.__version__}-gpu" in image.rsplit(":", 1)[1]
    docker = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r'pip install .*raybary\[gpu\]', docker) and "s3fs" in docker
    assert f"-t {image} ." in docker, "the build command in jobs/Dockerfile names the image"


# ------------------------------------------------------------------ docs/cluster.md
def _doc_commands() -> list[list[str]]:
    return [cmd for b in fenced(CLUSTER_DOC) for cmd in shell_commands(b.code)]


def test_docs_apply_this_manifest_with_the_secrets_it_reads(job):
    cmds = _doc_commands()
    applied = [c[c.index("-f") + 1] for c in cmds if c[:2] == ["kubectl", "apply"]]
    assert "jobs/kuberay-rayjob.yaml" in applied
    assert all((ROOT / path).is_file() for path in applied), applied
    created: dict[str, set[str]] = {}
    for c in cmds:
        if c[:4] == ["kubectl", "create", "secret", "generic"]:
            keys = {a.split("=", 2)[1] for a in c if a.startswith("--from-literal=")}
            keys |= {Path(a.split("=", 1)[1]).name if a.count("=") == 1 else a.split("=", 2)[1]
                     for a in c if a.startswith("--from-file=")}  # KEY=PATH, or PATH
            created.setdefault(c[4], set()).update(keys)
    needed: dict[str, set[str]] = {}
    for container in _containers(job).values():
        for e in container["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                needed.setdefault(ref["name"], set()).add(ref["key"])
    needed.setdefault(job["spec"]["rayClusterSpec"]["authOptions"]["secretName"],
                      set()).add("auth_token")  # KubeRay reads the token there
    for name, keys in needed.items():
        assert keys <= created.get(name, set()), f"docs create secret {name} with {keys}"


def test_docs_follow_the_job():
    text = CLUSTER_DOC.read_text()
    section = text[text.index("## Kubernetes"):]
    section = section[:section.find("\n## ", 3)]
    for phrase in ("kubectl get rayjob", "kubectl logs", "kubectl port-forward",
                   "ray job logs", "raybary status", "raybary show", "jobs/Dockerfile"):
        assert phrase in section, phrase
