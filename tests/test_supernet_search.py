"""Supernet mode end to end through the real CLI (the session's ``demo_supernet_search``: real
Ray Tune, Optuna, Ray Train, FFCV and MLflow), and a supernet mode search killed while its
supernet trains, run again, interrupted with SIGINT among its candidates and resumed."""
from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from mlflow_utils import query_store
from search_utils import mlflow_runs, non_dominated, refused_by_cli, run_cli, supernet_spec, tune_results

from tntsearch.model import TNTConfig
from tntsearch.supernet.search import MARKER
from tntsearch.tracking import TAG_ARCH, TAG_CHECKPOINT_URI, TAG_PARETO, TAG_ROLE, TAG_STATUS, TAG_WEIGHTS
from tntsearch.train import load_state

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


def _supernet_epochs_logged(db: Path) -> int:
    """How many epochs of a supernet training the SQLite store holds (0 before there is one)."""
    query = ("SELECT COUNT(DISTINCT m.step) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
             f"WHERE m.key = 'train_loss' AND t.key = '{TAG_ROLE}' AND t.value = 'supernet'")
    row = query_store(db, query)
    return row[0] if row else 0


def _forget_supernet_epoch(db: Path, epoch: int) -> None:
    """Delete the supernet's metrics of ``epoch`` from the SQLite store: what a driver killed
    after Ray Train registered that epoch's checkpoint, before it logged the epoch, leaves."""
    runs = "SELECT run_uuid FROM tags WHERE key = ? AND value = 'supernet'"
    with contextlib.closing(sqlite3.connect(db)) as c, c:
        for table in ("metrics", "latest_metrics"):
            c.execute(f"DELETE FROM {table} WHERE step = ? AND run_uuid IN ({runs})", (epoch, TAG_ROLE))


def _kill_9(leftovers: list):
    """A ``run_cli`` fault: SIGKILL the CLI alone (``kill -9 PID``), then wait up to 60 s for
    the processes it had started (its local Ray, the supernet's Train workers) to end; those
    still running are killed and put in ``leftovers``."""
    def send(cli) -> None:
        procs = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(cli.pid).children(recursive=True)
        cli.kill()
        _, alive = psutil.wait_procs(procs, timeout=60)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                leftovers.append(" ".join(proc.cmdline()))
                proc.kill()
    return send


def _checkpoint_epochs(run_dir: Path) -> dict[str, int]:
    """The supernet's Ray Train checkpoints in ``run_dir``: folder name -> the epoch it holds."""
    return {p.name: load_state(p)["epoch"] for p in sorted(run_dir.glob("checkpoint_*")) if p.is_dir()}


@pytest.mark.timeout(480)
def test_resume_neither_loses_nor_repeats_a_candidate(digits, tmp_path):
    """``kill -9`` while the supernet trains (epoch 1 of 2 checkpointed; its metrics then
    deleted from MLflow, the worst case of the kill), then the same command (no
    ``--resume``): the training goes on at epoch 2 in the same MLflow runs, epoch 1 logged
    from its checkpoint, then the candidates; SIGINT once 8 have reported, then
    ``--resume``: every candidate is in the table once, and only those Tune had not yet
    recorded as finished at its last snapshot run again (docs/faults.md, docs/supernet.md)."""
    n, epochs = 12, 2
    db = tmp_path / "mlflow.db"
    store = f"sqlite:///{db}"
    spec = supernet_spec(tmp_path, digits, "resumed", num_samples=n, supernet_epochs=epochs,
                         constraints={"max_macs": MAX_MACS}, tracking_uri=store)
    raw = yaml.safe_load(spec.read_text())
    raw["supernet"]["k"] = 0  # the largest and the smallest per step only: shorter epochs
    spec.write_text(yaml.safe_dump(raw))
    exp = tmp_path / "ray_results" / "resumed"
    leftovers: list[str] = []
    rc0, out0 = run_cli(spec, tmp_path, send=_kill_9(leftovers), interrupt_when=lambda: _supernet_epochs_logged(db) >= 1)
    assert rc0 == -signal.SIGKILL, out0[-3000:]
    assert not leftovers, ("processes of the killed CLI outlived it by 60 s", leftovers)
    assert _supernet_epochs_logged(db) == 1 and not (exp / "supernet" / MARKER).exists()
    killed = _checkpoint_epochs(exp / "supernet")
    assert sorted(killed.values()) == [1], killed
    _forget_supernet_epoch(db, 1)

    reported = lambda: sum(p.stat().st_size > 0 for p in exp.glob("run_trial_*/result.json"))  # noqa: E731
    rc1, out1 = run_cli(spec, tmp_path, interrupt_when=lambda: reported() >= 8)
    assert rc1 == 130, out1[-3000:]
    text = " ".join(out1.split())  # the screen wraps long lines when the output is not a terminal
    assert f"supernet: continuing its interrupted training of {epochs} epochs" in text, out1[-3000:]
    # Epoch 1 once more, from its checkpoint (MLflow lacked it), then the epochs trained now.
    assert re.findall(r"epoch (\d+) train_loss", text) == [str(e) for e in range(1, epochs + 1)], out1[-3000:]
    # Epoch 1's checkpoint is kept: the training went on from it (from scratch, retention would have dropped it).
    final = _checkpoint_epochs(exp / "supernet")
    assert killed.items() <= final.items() and sorted(final.values()) == list(range(1, epochs + 1)), final
    marker = json.loads((exp / "supernet" / MARKER).read_text())
    assert load_state(marker["checkpoint"])["epoch"] == epochs
    first = {t: len(rows) for t, rows in tune_results(exp).items()}
    # Candidates have run: the same command without --resume is refused, as in train_each mode.
    rc, err = refused_by_cli(spec, tmp_path)
    assert rc == 2 and "pass --resume to continue it" in err, err

    rc2, out2 = run_cli(spec, tmp_path, "--resume")
    assert rc2 == 0, out2[-3000:]
    text = " ".join(out2.split())
    assert f"search 'resumed': {n} candidates evaluated" in text
    results = tune_results(exp)
    assert len(results) == n
    repeated = [t for t, rows in results.items() if len(rows) > 1]
    # Tune saves its state on SIGINT: only the candidates in flight then (max_concurrent) run again.
    assert len(repeated) <= 2, repeated
    assert set(first) <= set(results)
    (parent,), children = mlflow_runs(store, "resumed")
    assert parent.info.status == "FINISHED"
    (run,) = [c for c in children if c.data.tags.get(TAG_ROLE) == "supernet"]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.run_id == marker["mlflow_run_id"]
    client = mlflow.MlflowClient(store)
    (kept,) = killed
    for key in ("train_loss", "val_top1_smallest"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, epochs + 1)), key
        assert history[0].value == pytest.approx(load_state(exp / "supernet" / kept)["metrics"][key])
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "candidates.json")).read_text())
    ids = [row[table["columns"].index("trial_id")] for row in table["data"]]
    assert sorted(ids) == sorted(results)
