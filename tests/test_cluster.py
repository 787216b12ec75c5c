"""The search on a real multi-node Ray cluster: a head and a second node on this machine
(``ray start``, one CPU each, tests/cluster_utils.py), the CLI connected with ``--address``.

Each Train worker holds a whole CPU, so two trials that train at the same time cannot
share a node: the two concurrent trials must train on different nodes. Where a trial
trained is the ``node_id`` its Train worker reports (``node_ip`` is the same for every
node of one machine), read from Tune's result files; the nodes' own ids come from their
raylets' command lines, not from Ray.
"""
from __future__ import annotations

import numpy as np
import pytest

from cluster_utils import start_cluster
from search_utils import demo_spec, mlflow_runs, raylet_node_id, run_cli, stop_cluster, tune_results
from tntsearch.pareto import pareto_mask, to_minimisation

pytestmark = pytest.mark.slow

NAME = "cluster"
NUM_SAMPLES = 2  # the demo's two baselines, tiny_vit and tiny_tnt, started together


@pytest.fixture(scope="module")
def cluster_search(tmp_path_factory, digits):
    cwd = tmp_path_factory.mktemp("cluster")
    spec = demo_spec(cwd, digits, NAME, num_samples=NUM_SAMPLES, epochs=1, max_concurrent=2)
    cluster = start_cluster(num_nodes=2, num_cpus=1)
    try:
        node_ids = [raylet_node_id(node) for node in cluster.nodes]
        rc, out = run_cli(spec, cwd, "--address", cluster.address, env=cluster.driver_env())
        (cwd / "cli.log").write_text(out)
    finally:
        left = stop_cluster(cluster)
    return {"cwd": cwd, "rc": rc, "out": out, "node_ids": node_ids, "left": left}


def test_search_on_the_cluster_finishes(cluster_search):
    assert cluster_search["rc"] == 0, cluster_search["out"][-3000:]
    assert f"[{NUM_SAMPLES}/{NUM_SAMPLES} done]" in cluster_search["out"]
    assert "Connecting to existing Ray cluster" in cluster_search["out"]  # not a Ray of its own


def test_trials_trained_on_both_nodes(cluster_search):
    head, worker = cluster_search["node_ids"]
    assert head != worker
    results = tune_results(cluster_search["cwd"] / "ray_results" / NAME)
    assert len(results) == NUM_SAMPLES
    trained_on = {}
    for tid, rows in results.items():
        epochs = [r for r in rows if r.get("epoch", 0) >= 1]
        assert epochs, f"trial {tid} never trained: {rows[-1]}"
        assert len({r["node_id"] for r in epochs}) == 1  # no failure, no move
        trained_on[tid] = epochs[-1]["node_id"]
    assert sorted(trained_on.values()) == sorted([head, worker]), trained_on


def test_every_trial_is_in_mlflow(cluster_search):
    parents, children = mlflow_runs(f"sqlite:///{cluster_search['cwd'] / 'mlflow.db'}", NAME)
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    tune_ids = set(tune_results(cluster_search["cwd"] / "ray_results" / NAME))
    assert sorted(c.data.tags["ray.trial_id"] for c in children) == sorted(tune_ids)
    assert {c.data.tags["baseline"] for c in children} == {"tiny_vit", "tiny_tnt"}
    for c in children:
        assert c.data.tags["status"] == "completed", c.data.tags
        assert {"val_top1", "macs", "params", "throughput"} <= set(c.data.metrics)
    points = to_minimisation(np.array([[c.data.metrics["val_top1"], c.data.metrics["macs"]] for c in children]), ["max", "min"])
    assert [c.data.tags["pareto"] == "true" for c in children] == list(pareto_mask(points))


def test_both_nodes_stopped(cluster_search):
    assert cluster_search["left"] == []
