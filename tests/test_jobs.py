"""jobs/: the cluster launcher config, the KubeRay manifests, the job scripts, and the local
multi-node helper of tests/cluster_utils.py.

Validation is by the owners' own rules where they ship them: Ray's cluster-launcher JSON schema
and ``prepare_config``/``validate_config``; the Kubernetes API schemas (kubernetes-validate,
when installed) for the pods, Deployment, Service, PVC and Job. KubeRay's RayJob CRD schema
ships in no PyPI package (kubernetes, kubernetes-validate and codeflare-sdk have none), so the
RayJob gets a structural check of the fields that the CRD
(ray.io/v1, KubeRay 1.x) requires. The scripts are run for real: the search entry point up to
its first check of the spec, the MLflow server with a real client, a 2-node Ray cluster.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster_utils import free_port, local_cluster

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
IMAGE_ROOT = "/home/ray/tntsearch"  # where jobs/Dockerfile and jobs/cluster.yaml put the checkout
SHARED = "/mnt/shared"
TNT_S = ROOT / "search_spaces" / "tnt_s.yaml"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _in_repo(path: str) -> Path:
    """A path as a node or container sees it, mapped back into this checkout."""
    if path.startswith(IMAGE_ROOT + "/"):
        path = path[len(IMAGE_ROOT) + 1:]
    return ROOT / path


def _pod_templates(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


# --- Ray cluster launcher config -------------------------------------------------------------


def _launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_passes_ray_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml(JOBS / "cluster.yaml")
    jsonschema.validate(config, _launcher_schema())
    # What `ray up` does before it contacts the cloud: defaults merged, then validated again.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")


def test_ray_launcher_schema_rejects_a_misspelt_field():
    config = _yaml(JOBS / "cluster.yaml")
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(config, _launcher_schema())


def test_cluster_nodes_hold_the_tnt_s_trials():
    """A trial's DDP workers fit on one GPU node, and the nodes hold max_concurrent trials."""
    from tntsearch.spec import load_spec

    spec = load_spec(TNT_S)
    config = _yaml(JOBS / "cluster.yaml")
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types, "no GPU node type"
    r = spec.resources
    per_trial = {"GPU": r.num_workers * r.gpus_per_worker, "CPU": r.num_workers * r.cpus_per_worker}
    capacity = 0
    for node_type in gpu_types:
        fits = min(node_type["resources"][k] // v for k, v in per_trial.items())
        assert fits >= 1, f"one trial needs {per_trial}, a node has {node_type['resources']}"
        capacity += fits * node_type["max_workers"]
    assert capacity >= spec.search.max_concurrent
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpu_types)


# --- KubeRay RayJob and the Kubernetes objects beside it ----------------------------------------


def test_rayjob_has_the_fields_kuberay_requires():
    job = _yaml(JOBS / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):  # the CRD's required list
            assert key in group, f"workerGroupSpecs[{group.get('groupName')}] lacks {key}"
        assert isinstance(group.get("rayStartParams", {}), dict)
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
    gpus = sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups
    )
    assert gpus > 0, "no worker group asks for GPUs"


def test_rayjob_entrypoint_survives_kuberays_submitter_shell():
    """KubeRay pastes the entrypoint unquoted into ``bash -c "ray job submit ... -- <it> ; ..."``
    (ray-operator/controllers/ray/common/job.go): a shell operator would run in the submitter."""
    entrypoint = _yaml(JOBS / "rayjob.yaml")["spec"]["entrypoint"]
    assert not re.search(r"[;&|<>`$()]", entrypoint), entrypoint


def test_k8s_objects_fit_together():
    """One image everywhere; every mount has a volume; the shared claim, the mount path, the
    job's TNTSEARCH_SHARED_DIR and the MLflow Service agree."""
    job = _yaml(JOBS / "rayjob.yaml")
    base = {d["kind"]: d for d in _docs(JOBS / "k8s-base.yaml")}
    convert = _yaml(JOBS / "k8s-convert.yaml")
    templates = {**_pod_templates(job), "mlflow": base["Deployment"]["spec"]["template"],
                 "convert": convert["spec"]["template"]}
    images = {c["image"] for t in templates.values() for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    claim = base["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in base["PersistentVolumeClaim"]["spec"]["accessModes"]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    for name, template in templates.items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, f"{name}: mount {mount['name']} has no volume"
                claim_of = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
                if claim_of:
                    assert claim_of == claim and mount["mountPath"] == env["TNTSEARCH_SHARED_DIR"], name
    service = base["Service"]
    url = urllib.parse.urlsplit(env["MLFLOW_TRACKING_URI"])
    assert url.hostname == service["metadata"]["name"]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = base["Deployment"]["spec"]
    assert service["spec"]["selector"].items() <= deployment["template"]["metadata"]["labels"].items()
    server_env = {e["name"]: e["value"] for e in deployment["template"]["spec"]["containers"][0]["env"]}
    assert any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), f"{url.hostname}:{url.port}")
               for p in server_env["MLFLOW_ALLOWED_HOSTS"].split(",")), "the server would answer 403 to the driver"


def test_k8s_objects_pass_the_kubernetes_api_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    for path in (JOBS / "k8s-base.yaml", JOBS / "k8s-convert.yaml"):
        for doc in _docs(path):
            kv.validate(doc, version, strict=True)
    for name, template in _pod_templates(_yaml(JOBS / "rayjob.yaml")).items():
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template},
                    version, strict=True)


def test_convert_job_writes_the_files_the_spec_reads():
    convert = _yaml(JOBS / "k8s-convert.yaml")["spec"]["template"]["spec"]["containers"][0]
    spec = _yaml(TNT_S)
    script = convert["command"][-1]
    written = re.findall(r"tntsearch\.data convert \S+ (\S+)", script)
    assert sorted(written) == sorted([spec["data"]["train"], spec["data"]["val"]])
    job_env = yaml.safe_load(_yaml(JOBS / "rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert convert["workingDir"] == job_env["TNTSEARCH_SHARED_DIR"]  # where the search resolves data/


# --- what the configs name exists -----------------------------------------------------------------


def _commands() -> list[str]:
    """Every command line the configs run on a node or in a container."""
    cluster = _yaml(JOBS / "cluster.yaml")
    cmds = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                          "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
            for c in cluster.get(key, [])]
    cmds.append(_yaml(JOBS / "rayjob.yaml")["spec"]["entrypoint"])
    for doc in _docs(JOBS / "k8s-base.yaml") + _docs(JOBS / "k8s-convert.yaml"):
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            cmds.append(shlex.join(container.get("command", [])))
    cmds += re.findall(r"^RUN (.+)$", (JOBS / "Dockerfile").read_text(), flags=re.M)
    return cmds


def _documented_commands() -> list[str]:
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "cluster.md", JOBS / "README.md", JOBS / "runtime_env.yaml"))
    return [line.strip().lstrip("#").strip() for line in text.splitlines()]


def test_configs_and_docs_name_files_and_modules_that_exist():
    # Where the checkout lies on a node and in the image, which the commands below rely on.
    assert _yaml(JOBS / "cluster.yaml")["file_mounts"] == {IMAGE_ROOT: "."}
    assert re.search(rf"^COPY .* \. {IMAGE_ROOT}$", (JOBS / "Dockerfile").read_text(), flags=re.M)
    lines = _commands() + _documented_commands()
    paths = {m for line in lines for m in re.findall(r"((?:/home/ray/tntsearch/)?(?:jobs|search_spaces|tests)/[\w./-]+\.(?:sh|yaml|py|md))", line)}
    assert {"jobs/run_search.sh", "search_spaces/tnt_s.yaml"} <= {p.removeprefix(IMAGE_ROOT + "/") for p in paths}
    missing = sorted(p for p in paths if not _in_repo(p).is_file())
    assert not missing, f"named but not in the repo: {missing}"
    modules = {m for line in lines for m in re.findall(r"python -m ([\w.]+)", line)}
    assert "tntsearch.run" in modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    # The search's entry point, as jobs/run_search.sh runs it.
    assert "-m tntsearch.run" in (JOBS / "run_search.sh").read_text()
    assert callable(importlib.import_module("tntsearch.run").main)


# --- runtime environments ------------------------------------------------------------------------


def _job_runtime_envs() -> dict[str, dict]:
    return {
        "jobs/runtime_env.yaml": _yaml(JOBS / "runtime_env.yaml"),
        "jobs/rayjob.yaml": yaml.safe_load(_yaml(JOBS / "rayjob.yaml")["spec"]["runtimeEnvYAML"]),
    }


def test_job_runtime_envs_merge_with_the_search_drivers_own():
    """Ray refuses a driver whose ``ray.init(runtime_env=...)`` sets a variable that the job's
    runtime_env sets too (ray/_private/worker.py); tntsearch.run hands MLflow's telemetry switch
    to its workers that way."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from tntsearch.tracking import TELEMETRY_ENV

    driver_env = {"env_vars": dict(TELEMETRY_ENV)}
    for name, env in _job_runtime_envs().items():
        assert set(env) <= set(RuntimeEnv.known_fields), name
        RuntimeEnv(**env)  # Ray's own type checks (env_vars: dict[str, str] ...)
        assert env["env_vars"]["TNTSEARCH_SHARED_DIR"] == SHARED, name
        assert _merge_runtime_env(env, driver_env) is not None, f"{name} conflicts with tntsearch.run's ray.init"
        clashing = {**env, "env_vars": {**env["env_vars"], **TELEMETRY_ENV}}
        assert _merge_runtime_env(clashing, driver_env) is None  # the check above can fail


# --- jobs/run_search.sh ----------------------------------------------------------------------------


def _run_search(shared: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TNTSEARCH_SHARED_DIR"}
    env.update(PYTHON=sys.executable, MLFLOW_DISABLE_TELEMETRY="true")
    if shared is not None:
        env["TNTSEARCH_SHARED_DIR"] = str(shared)
    return subprocess.run(["sh", "jobs/run_search.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_run_search_resolves_the_spec_against_the_shared_dir(tmp_path, digits):
    """The real tnt_s spec, started from the shared dir, finds its data there (the digits
    files stand in for ImageNet's: the files are read and checked before Ray starts) and looks
    for its Ray Tune storage there: ``--resume`` of a search that never ran stops with exit
    code 2, naming that path."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copyfile(digits / f"{split}.beton", shared / "data" / f"imagenet_{split}.beton")
    r = _run_search(shared, "search_spaces/tnt_s.yaml", "--resume")
    assert r.returncode == 2, r.stderr
    assert "data." not in r.stderr
    assert str(shared / "ray_results" / "tnt_s_search") in r.stderr


def test_run_search_needs_a_shared_dir(tmp_path):
    for shared in (None, tmp_path / "absent"):
        r = _run_search(shared, "search_spaces/tnt_s.yaml")
        assert r.returncode == 2
        assert "TNTSEARCH_SHARED_DIR" in r.stderr


# --- jobs/mlflow_server.sh ---------------------------------------------------------------------------


def _status(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_server_serves_the_store_a_search_in_the_shared_dir_writes(tmp_path):
    from mlflow.tracking import MlflowClient

    from tntsearch.tracking import resolve_tracking_uri

    store = tmp_path / "shared"
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_ALLOWED_HOSTS": "mlflow:*,mlflow.*", "MLFLOW_START_TIMEOUT": "240"}
    start = ["bash", str(JOBS / "mlflow_server.sh"), str(store), "--background"]
    pid_file = store / "mlflow-server.pid"
    try:
        r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(pid_file.read_text())
        url = f"http://127.0.0.1:{port}"

        # A run logged through the server lands in DIR/mlflow.db, its artifact in DIR/mlartifacts.
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("jobs-test"))
        client.log_metric(run.info.run_id, "val_top1", 71.5)
        (tmp_path / "note.txt").write_text("front")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert [p.read_text() for p in (store / "mlartifacts").rglob("note.txt")] == ["front"]
        # ... the same store that a search started in DIR writes when no tracking URI is given.
        fallback = resolve_tracking_uri(None, store)
        assert fallback == f"sqlite:///{store / 'mlflow.db'}"
        assert MlflowClient(tracking_uri=fallback).get_run(run.info.run_id).data.metrics == {"val_top1": 71.5}

        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(api, f"mlflow:{port}") == 200
        assert _status(api, f"mlflow.tntsearch.svc.cluster.local:{port}") == 200
        assert _status(api, f"10.0.0.7:{port}") == 200  # MLflow's private-IP default is kept
        assert _status(api, f"elsewhere.example:{port}") == 403

        again = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already" in again.stdout
        assert int(pid_file.read_text()) == pid
    finally:
        if pid_file.exists():
            _stop(int(pid_file.read_text()))


def _stop(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


# --- tests/cluster_utils.py ------------------------------------------------------------------------


_NODES = """
import json, ray
ray.init()
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "cpu": n["Resources"].get("CPU")} for n in ray.nodes()]))
"""


@pytest.mark.slow
def test_two_node_local_cluster_starts_and_stops_cleanly():
    with local_cluster(num_nodes=2, num_cpus=1) as cluster:
        r = subprocess.run([sys.executable, "-c", _NODES], env=cluster.driver_env(), capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        nodes = json.loads(r.stdout.strip().splitlines()[-1])
        assert [n["alive"] for n in nodes] == [True, True]
        assert len({n["id"] for n in nodes}) == 2 and [n["cpu"] for n in nodes] == [1.0, 1.0]
        for node in cluster.nodes:
            node._remember_descendants()
        started = [p for node in cluster.nodes for p in node.descendants]
        assert {p.name() for p in started} >= {"gcs_server", "raylet"}
        temp_dir = cluster.temp_dir
    assert all(not node.alive for node in cluster.nodes)
    deadline = time.monotonic() + 30
    while cluster.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.leftover_processes() == []
    assert not temp_dir.exists()
