"""Supernet mode end to end through the real CLI (the session's ``demo_supernet_search``: real
Ray Tune, Optuna, Ray Train, FFCV and MLflow), and a supernet mode search interrupted with
SIGINT and resumed."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from search_utils import mlflow_runs, non_dominated, run_cli, supernet_spec, tune_results

from tntsearch.model import TNTConfig
from tntsearch.tracking import TAG_ARCH, TAG_CHECKPOINT_URI, TAG_PARETO, TAG_ROLE, TAG_STATUS, TAG_WEIGHTS

pytestmark = pytest.mark.slow

MAX_MACS = 3.0e6


def _table(search) -> list[dict]:
    """The parent's candidates.json, as rows."""
    client = mlflow.MlflowClient(search.tracking_uri)
    path = client.download_artifacts(search.parent_run_id, "candidates.json")
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _children(search):
    _, children = mlflow_runs(search.tracking_uri, search.spec.experiment)
    return [c for c in children if c.data.tags.get(TAG_ROLE) == "trial"]


def test_summary_line_counts_every_candidate_and_each_network_once(demo_supernet_search):
    """The line counts candidates, and distinct networks apart from repeats: configs of one
    network (``TNTConfig.network_key``) are one architecture, measured and scored once."""
    s = demo_supernet_search
    text = " ".join(s.output.split())  # the screen wraps long lines when the output is not a terminal
    m = re.search(rf"search '{s.spec.name}': (\d+) candidates evaluated \((\d+) distinct architectures: "
                  rf"(\d+) scored [^,]*, (\d+) infeasible; (\d+) repeats of those\)", text)
    assert m, s.output[-2000:]
    n, distinct, scored, infeasible, repeats = map(int, m.groups())
    assert n == s.spec.search.num_samples == len(s.results)
    networks: dict[str, list[dict]] = {}
    for tid in s.results:
        networks.setdefault(TNTConfig.from_dict(s.last(tid)["arch"]).network_key(), []).append(s.last(tid))
    assert distinct == len(networks) < n and repeats == n - distinct  # NSGA-II proposed some again
    feasible = [rows for rows in networks.values() if rows[0]["feasible"] == 1]
    assert scored == len(feasible) and infeasible == distinct - scored >= 1  # tiny_tnt at least
    for rows in feasible:  # a repeat answered from the cache got a measurement taken for this network
        assert all(r["feasible"] == 1 for r in rows)
        measured = {(r["throughput"], r["search_top1"]) for r in rows if not r["cached"]}
        assert measured and all((r["throughput"], r["search_top1"]) in measured for r in rows if r["cached"])
    assert "candidates/min" in text[m.start():] and "overhead" in text[m.start():]


def test_every_candidate_once_in_the_table(demo_supernet_search):
    s = demo_supernet_search
    rows = _table(s)
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)) == s.spec.search.num_samples
    assert set(ids) == set(s.results)
    for r in rows:
        last = s.last(r["trial_id"])
        assert json.loads(r["arch"]) == last["arch"]
        assert r["macs"] == pytest.approx(last["macs"])
        if r["status"] == "completed":
            assert r["search_top1"] == pytest.approx(last["search_top1"])


def test_infeasible_candidates_are_never_scored(demo_supernet_search):
    s = demo_supernet_search
    assert s.infeasible()
    rows = {r["trial_id"]: r for r in _table(s)}
    for tid in s.infeasible():
        (only,) = s.reported(tid)  # one report, epoch 0
        assert only["epoch"] == 0 and only["macs"] > MAX_MACS
        assert "eval_time_s" not in only and "search_top1" not in only
        assert rows[tid]["status"] == "infeasible" and rows[tid]["search_top1"] is None
    for tid in s.trained():
        (only,) = s.reported(tid)
        assert only["epoch"] == 1 and only["macs"] <= MAX_MACS and 0 <= only["search_top1"] <= 100


def test_front_is_non_dominated_and_feasible(demo_supernet_search):
    """The front the children carry is the non-dominated set of every scored candidate on the
    selection data's top-1 and MACs (brute force over the Tune results), each network once."""
    s = demo_supernet_search
    front = [c for c in _children(s) if c.data.tags[TAG_PARETO] == "true"]
    assert front
    scored = {tid: (s.last(tid)["search_top1"], s.last(tid)["macs"]) for tid in s.trained()}
    expected = {TNTConfig.from_dict(s.last(t)["arch"]).network_key() for t in non_dominated(scored)}
    got = [TNTConfig.from_dict(json.loads(c.data.tags[TAG_ARCH])).network_key() for c in front]
    assert sorted(got) == sorted(expected)
    for c in front:
        assert c.data.metrics["feasible"] == 1 and c.data.metrics["macs"] <= MAX_MACS


def test_children_carry_the_export_interface(demo_supernet_search):
    """Front points and baselines are child runs with the architecture, the supernet's
    checkpoint, weights=supernet, val_top1 on data.val and search_top1 on the held-out slice;
    val_top1 is what the extracted model scores on data.val (tntsearch.train.evaluate with
    make_loaders' val loader)."""
    import torch

    from tntsearch.data import make_loaders
    from tntsearch.supernet import Supernet
    from tntsearch.train import evaluate, load_state

    s = demo_supernet_search
    children = _children(s)
    assert {"tiny_vit", "tiny_tnt"} <= {c.data.tags.get("baseline") for c in children}
    checkpoints = {c.data.tags[TAG_CHECKPOINT_URI] for c in children}
    assert len(checkpoints) == 1 and Path(next(iter(checkpoints))).is_dir()
    for c in children:
        assert c.data.tags[TAG_WEIGHTS] == "supernet"
        TNTConfig.from_dict(json.loads(c.data.tags[TAG_ARCH]))
        if c.data.tags[TAG_STATUS] == "completed":
            assert {"val_top1", "search_top1", "macs", "throughput"} <= set(c.data.metrics)
    point = next(c for c in children if c.data.tags[TAG_PARETO] == "true")
    net = Supernet(s.spec.space)
    net.load_state_dict(load_state(next(iter(checkpoints)))["model"])
    _, val = make_loaders(s.spec.data, 32, device="cpu")
    arch = TNTConfig.from_dict(json.loads(point.data.tags[TAG_ARCH]))
    _, top1, _ = evaluate(net.extract(arch), val, torch.device("cpu"), None, 10)
    assert point.data.metrics["val_top1"] == pytest.approx(top1, abs=1e-6)


def test_supernet_training_is_a_nested_run_with_curves(demo_supernet_search):
    s = demo_supernet_search
    _, children = mlflow_runs(s.tracking_uri, s.spec.experiment)
    (run,) = [c for c in children if c.data.tags.get(TAG_ROLE) == "supernet"]
    assert run.data.tags["mlflow.parentRunId"] == s.parent_run_id
    history = mlflow.MlflowClient(s.tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, s.spec.supernet.epochs + 1))


@pytest.mark.timeout(300)
def test_resume_neither_loses_nor_repeats_a_candidate(demo_supernet_search, digits, tmp_path):
    """SIGINT once 8 candidates have reported, then --resume: every candidate is in the table
    once, and only those Tune had not yet recorded as finished at its last snapshot run again.
    The session search's finished supernet is copied in and reused (no training here)."""
    s = demo_supernet_search
    n = 24
    spec = supernet_spec(tmp_path, digits, "resumed", num_samples=n, supernet_epochs=s.spec.supernet.epochs,
                         constraints={"max_macs": MAX_MACS}, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    src = Path(s.spec.storage, s.spec.name, "supernet", "tntsearch-supernet.json")
    dst = tmp_path / "ray_results" / "resumed" / "supernet"
    dst.mkdir(parents=True)
    shutil.copy(src, dst)
    exp = tmp_path / "ray_results" / "resumed"
    reported = lambda: sum(p.stat().st_size > 0 for p in exp.glob("run_trial_*/result.json"))  # noqa: E731
    rc1, out1 = run_cli(spec, tmp_path, interrupt_when=lambda: reported() >= 8)
    assert rc1 == 130, out1[-3000:]
    assert "reusing the finished training" in " ".join(out1.split())
    first = {t: len(rows) for t, rows in tune_results(exp).items()}
    rc2, out2 = run_cli(spec, tmp_path, "--resume")
    assert rc2 == 0, out2[-3000:]
    assert f"search 'resumed': {n} candidates evaluated" in " ".join(out2.split())
    results = tune_results(exp)
    assert len(results) == n
    repeated = [t for t, rows in results.items() if len(rows) > 1]
    # Tune saves its state on SIGINT: only the candidates in flight then (max_concurrent) run again.
    assert len(repeated) <= 2, repeated
    assert set(first) <= set(results)
    (parent,), _ = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "resumed")
    table = json.loads(Path(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        parent.info.run_id, "candidates.json")).read_text())
    ids = [row[table["columns"].index("trial_id")] for row in table["data"]]
    assert sorted(ids) == sorted(results)
