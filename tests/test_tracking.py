"""MlflowTracker against a real SQLite tracking store fed by a real (small) Ray Tune search.

The trainable follows the trial result contract of ``tntsearch.search`` (arch, costs,
feasible/violation, baseline, epoch; per-epoch training metrics), with canned numbers so
that the statuses, the front and its hypervolume can be computed by hand. Ray starts once
for this module (a fixture here until tests/conftest.py offers a shared one).
"""
from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from cluster_utils import free_port
from search_utils import demo_spec
from tntsearch import report, run
from tntsearch.tracking import (
    MlflowTracker,
    TAG_ARCH,
    TAG_PARETO,
    TAG_REASON,
    TAG_STATUS,
    prepare_store,
    read_fallback,
    resolve_tracking_uri,
)

import ray  # noqa: E402  (after tntsearch.tracking: MLflow telemetry is off before Ray starts)
from mlflow.tracking import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler, TrialScheduler  # noqa: E402

# Test modules are not importable on Ray workers: ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPOCHS = 3
OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 4e6)]

# name -> what the trial does. acc: val_top1 per epoch.
TRIALS = {
    "baseline": dict(kind="ok", baseline="tiny_vit", inner_dim=8, tnt_blocks=[], params=1e5, macs=1e6, throughput=900.0, acc=[0.5, 0.6, 0.7]),
    "best": dict(kind="ok", inner_dim=16, tnt_blocks=[1, 2], params=2e5, macs=2e6, throughput=500.0, acc=[0.6, 0.7, 0.8]),
    "dominated": dict(kind="ok", inner_dim=32, tnt_blocks=[2], params=3e5, macs=3e6, throughput=400.0, acc=[0.55, 0.7, 0.75]),
    "infeasible": dict(kind="infeasible", inner_dim=32, tnt_blocks=[1, 2], params=5e5, macs=5e6),
    "crash": dict(kind="crash", inner_dim=16, tnt_blocks=[1], params=2e5, macs=2.5e6, acc=[0.4, 0.5, 0.6]),
    "pruned": dict(kind="ok", inner_dim=8, tnt_blocks=[1], params=5e4, macs=5e5, acc=[0.2, 0.3, 0.35]),
}
EXPECTED_STATUS = {"baseline": "completed", "best": "completed", "dominated": "completed",
                   "infeasible": "infeasible", "crash": "failed", "pruned": "stopped_early"}
ON_FRONT = {"baseline", "best", "pruned"}
# Front (min MACs, max accuracy) with ref (acc 0, 4e6 MACs): MACs [0.5e6, 1e6) reach 0.2,
# [1e6, 2e6) reach 0.7, [2e6, 4e6) reach 0.8 -> 0.5e6*0.2 + 1e6*0.7 + 2e6*0.8 = 2.4e6.
HYPERVOLUME = 2.4e6


def _arch(config):
    return {"img_size": 32, "patch_size": 8, "outer_dim": 64, "depth": 2, "outer_heads": 2, "mlp_ratio": 2.0,
            "inner_dim": config["inner_dim"], "words": 4, "inner_heads": 1, "inner_mlp_ratio": 2.0, "se": "none",
            "se_ratio": 0.25, "tnt_blocks": config["tnt_blocks"], "drop_path": 0.0, "num_classes": 10}


def contract_trainable(config):
    """Reports like tntsearch.search's trainable: costs first, then one result per epoch."""
    base = {"arch": _arch(config), "params": config["params"], "macs": config["macs"],
            "throughput": config.get("throughput", float("nan")), "baseline": config.get("baseline", "")}
    if config["kind"] == "infeasible":
        # Like tntsearch.search: unmeasured objectives carry their reference value (for the
        # sampler), plus one relative value per constraint (> 0: violated).
        tune.report({**base, "feasible": 0, "violation": 0.25, "epoch": 0, "val_top1": 0.0,
                     "constraint_max_macs": 0.25, "constraint_max_params": -0.5})
        return
    for epoch in range(1, EPOCHS + 1):
        if config["kind"] == "crash" and epoch == 2:
            raise ValueError("boom at epoch 2")
        time.sleep(0.1)
        acc = config["acc"][epoch - 1]
        tune.report({**base, "feasible": 1, "violation": 0.0, "epoch": epoch, "train_loss": 2.0 - acc,
                     "val_loss": 2.1 - acc, "val_top1": acc, "val_top5": min(1.0, acc + 0.15),
                     "lr": 1e-3 / epoch, "images_per_s": 100.0 + epoch})


class StopLowAccuracy(FIFOScheduler):
    """A scheduler decision like ASHA's: stop a trial below 0.3 top-1 after its first epoch."""

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("epoch", 0) >= 1 and result.get("val_top1", 1.0) < 0.3:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def run_search(trackers, storage: Path, names=tuple(TRIALS)):
    configs = [{"name": n, **TRIALS[n]} for n in names]
    tuner = tune.Tuner(
        contract_trainable,
        param_space=tune.grid_search(configs),
        tune_config=tune.TuneConfig(max_concurrent_trials=2, scheduler=StopLowAccuracy(), reuse_actors=True),
        run_config=tune.RunConfig(name="t", storage_path=str(storage), callbacks=list(trackers), verbose=0),
    )
    return tuner.fit()


def _spec(name="tiny"):
    return {"name": name, "objectives": [{"metric": m, "mode": d, "ref": r} for m, d, r in OBJECTIVES],
            "search": {"num_samples": len(TRIALS), "max_concurrent": 2}, "train": {"epochs": EPOCHS, "lr": 0.002}}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An empty store made by prepare_store; copied for every other store in this module
    (creating MLflow's schema runs ~60 alembic migrations: seconds each time)."""
    uri = prepare_store(resolve_tracking_uri("sub/dir/mlflow.db", tmp_path_factory.mktemp("template")))
    return Path(uri[len("sqlite:///"):])


def _store(template_db: Path, workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, workdir / "mlflow.db")
    return prepare_store(resolve_tracking_uri(None, workdir))


@pytest.fixture(scope="module")
def searched(ray_session, template_db, tmp_path_factory):
    """One search logged twice: into an embedded SQLite store, and towards a tracking
    server that is down (nothing listens on the port), which must leave a fallback file.
    Returns (tracker, uri, workdir, trial id -> config name, offline tracker)."""
    workdir = tmp_path_factory.mktemp("run")
    spec_path = workdir / "tiny.yaml"
    spec_path.write_text("name: tiny\n# the spec file, logged verbatim\n")
    uri = _store(template_db, workdir)
    tracker = MlflowTracker(uri, "tiny-exp", _spec(), spec_path, OBJECTIVES, EPOCHS, final_retry_s=5)
    offline = MlflowTracker(f"http://127.0.0.1:{free_port()}", "offline-exp", _spec("offline"), None, OBJECTIVES, EPOCHS,
                            fallback_path=workdir / "pending.jsonl", final_retry_s=1.0, max_backoff_s=0.5)
    results = run_search([tracker, offline], workdir / "ray_results")
    names = {r.metrics["trial_id"]: r.config["name"] for r in results}
    return tracker, uri, workdir, names, offline


def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_resolve_tracking_uri_is_always_absolute(tmp_path, monkeypatch):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/x.db", ".") == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("runs.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs.db"
    assert resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    for bad in ("file:///tmp/mlruns", "./mlruns", "sqlite://x.db"):
        with pytest.raises(ValueError, match="tracking_uri"):
            resolve_tracking_uri(bad, tmp_path)
    with pytest.raises(ValueError, match="absolute"):
        MlflowTracker("sqlite:///rel.db", "e", {}, None, OBJECTIVES, EPOCHS)


def test_prepare_store_creates_the_schema_before_anyone_logs(template_db):
    tables = {r[0] for r in sqlite3.connect(template_db).execute("select name from sqlite_master where type='table'")}
    assert {"runs", "metrics", "params", "tags", "experiments", "alembic_version"} <= tables
    assert not any(t.startswith("_alembic_tmp") for t in tables)


def test_every_trial_has_one_child_run_with_all_its_records(searched):
    tracker, uri, workdir, names, _ = searched
    client = MlflowClient(uri)
    children = _children(client, tracker.parent_run_id)
    assert len(children) == len(TRIALS) == len(names)
    assert tracker.pending == 0 and tracker.undeliverable == []
    by_name = {names[c.data.tags["ray.trial_id"]]: c for c in children}
    assert set(by_name) == set(TRIALS)
    for name, run in by_name.items():
        cfg = TRIALS[name]
        p = run.data.params
        assert p["inner_dim"] == str(cfg["inner_dim"]) and p["words"] == "4" and p["se"] == "none"
        assert p["tnt_blocks"] == ",".join(map(str, cfg["tnt_blocks"]))
        assert json.loads(run.data.tags[TAG_ARCH]) == _arch(cfg)
        assert run.data.metrics["macs"] == cfg["macs"] and run.data.metrics["params"] == cfg["params"]
        if cfg["kind"] == "infeasible":
            assert run.data.metrics["feasible"] == 0 and run.data.metrics["violation"] == 0.25
            assert "val_top1" not in run.data.metrics and "train_loss" not in run.data.metrics  # ref fill ≠ measurement
            assert run.data.metrics["constraint_max_macs"] == 0.25
            assert run.data.tags["infeasible_reason"] == "max_macs +25%"
            continue
        history = client.get_metric_history(run.info.run_id, "val_top1")
        n = {"crash": 1, "pruned": 1}.get(name, EPOCHS)
        assert sorted((m.step, m.value) for m in history) == list(zip(range(1, n + 1), cfg["acc"][:n]))
        for metric in ("train_loss", "val_loss", "val_top5", "lr", "images_per_s"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == n, metric
        assert run.data.metrics["epochs_done"] == n
    # Throughput is NaN when not measured: not logged rather than logged as NaN.
    assert "throughput" not in by_name["pruned"].data.metrics
    assert by_name["baseline"].data.tags["baseline"] == "tiny_vit"
    # Two trials really ran at the same time (their child runs overlap).
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    # One database only, at the absolute path: no stray store under the trial directories.
    assert [p.name for p in workdir.rglob("*.db")] == ["mlflow.db"]


def test_statuses_and_failure_reason(searched):
    tracker, uri, _, names, _ = searched
    client = MlflowClient(uri)
    for run in _children(client, tracker.parent_run_id):
        name = names[run.data.tags["ray.trial_id"]]
        assert run.data.tags[TAG_STATUS] == EXPECTED_STATUS[name], name
        assert run.info.status == ("FAILED" if name == "crash" else "FINISHED")
        if name == "crash":
            assert run.data.tags[TAG_REASON] == "ValueError: boom at epoch 2"
            error_txt = client.download_artifacts(run.info.run_id, "error.txt")
            assert "boom at epoch 2" in Path(error_txt).read_text()
        else:
            assert TAG_REASON not in run.data.tags


def test_front_tags_and_hypervolume_on_the_parent(searched):
    tracker, uri, _, names, _ = searched
    client = MlflowClient(uri)
    for run in _children(client, tracker.parent_run_id):
        name = names[run.data.tags["ray.trial_id"]]
        assert run.data.tags[TAG_PARETO] == ("true" if name in ON_FRONT else "false"), name
    hv = client.get_metric_history(tracker.parent_run_id, "hypervolume")
    assert [m.step for m in sorted(hv, key=lambda m: m.step)] == list(range(1, len(TRIALS) + 1))
    assert max(hv, key=lambda m: m.step).value == pytest.approx(HYPERVOLUME)
    assert all(b.value >= a.value for a, b in zip(sorted(hv, key=lambda m: m.step), sorted(hv, key=lambda m: m.step)[1:]))
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.metrics["front_size"] == 3 and parent.data.metrics["trials_failed"] == 1
    assert {names[r["trial_id"]] for r in tracker.front()} == ON_FRONT


def test_parent_has_the_spec_settings_and_the_front_pictures(searched):
    tracker, uri, workdir, _, _ = searched
    client = MlflowClient(uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.params["train.lr"] == "0.002" and parent.data.params["search.max_concurrent"] == "2"
    assert json.loads(parent.data.params["tntsearch.objectives"]) == [list(o) for o in OBJECTIVES]
    assert parent.data.tags["tntsearch.role"] == "search"
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/val_top1_vs_macs.png", "pareto/val_top1_vs_params.png", "pareto/val_top1_vs_throughput.png",
            "pareto/front.html", "pareto/front.json"} <= files
    local = Path(client.download_artifacts(parent.info.run_id, "pareto/val_top1_vs_macs.png"))
    assert local.read_bytes()[:4] == b"\x89PNG"
    front = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto/front.json")).read_text())
    assert front["hypervolume"] == pytest.approx(HYPERVOLUME) and len(front["front"]) == 3
    spec_files = {a.path for a in client.list_artifacts(parent.info.run_id, "spec")}
    assert spec_files == {"spec/spec.json", "spec/tiny.yaml"}
    # Artifacts live beside the database, not in whatever directory the driver ran from.
    assert parent.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())


def test_report_rebuilds_the_front_from_mlflow(searched, tmp_path, capsys):
    tracker, uri, _, names, _ = searched
    search = report.load_search(uri, experiment="tiny-exp")
    assert search.parent_run_id == tracker.parent_run_id
    assert search.hypervolume == pytest.approx(HYPERVOLUME)
    front = report.load_search(uri, run_id=tracker.parent_run_id).front
    assert [names[r["trial_id"]] for r in front] == ["best", "baseline", "pruned"]  # best accuracy first
    assert front[0]["arch"] == _arch(TRIALS["best"]) and front[0]["run_id"]
    assert report.main(["--experiment", "tiny-exp", "--tracking-uri", uri, "--out", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (3 trials)" in out and "tiny_vit" in out and "stopped_early" in out
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == [
        "front.html", "val_top1_vs_macs.png", "val_top1_vs_params.png", "val_top1_vs_throughput.png"]
    assert report.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`experiment` 'nope' not found" in err[0]


def test_resume_adopts_the_earlier_trials(searched, template_db, tmp_path):
    tracker, uri, workdir, _, _ = searched
    shutil.copy(workdir / "mlflow.db", tmp_path / "mlflow.db")
    uri2 = prepare_store(resolve_tracking_uri(None, tmp_path))
    resumed = MlflowTracker(uri2, "tiny-exp", _spec(), None, OBJECTIVES, EPOCHS,
                            resume_parent_run_id=tracker.parent_run_id, final_retry_s=5)
    run_search([resumed], tmp_path / "ray_results", names=("dominated",))
    assert resumed.parent_run_id == tracker.parent_run_id
    client = MlflowClient(uri2)
    assert len(_children(client, tracker.parent_run_id)) == len(TRIALS) + 1
    hv = client.get_metric_history(tracker.parent_run_id, "hypervolume")
    last = max(hv, key=lambda m: m.step)
    assert last.step == len(TRIALS) + 1 and last.value == pytest.approx(HYPERVOLUME)
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"


def test_unreachable_server_leaves_a_fallback_file_that_imports(searched, template_db, tmp_path):
    tracker, uri, workdir, names, offline = searched
    fallback = workdir / "pending.jsonl"
    assert offline.parent_run_id is None and offline.pending > 0 and offline.fallback_path == fallback
    header, records = read_fallback(fallback)
    assert header["tracking_uri"] == offline.tracking_uri and header["delivered"] == 0
    assert len(records) == offline.pending
    assert sum(r["op"] == "start" for r in records) == 1 + len(TRIALS)

    store = _store(template_db, tmp_path / "later")
    assert report.main(["--import", str(fallback), "--tracking-uri", store]) == 0
    imported = report.load_search(store, experiment="offline-exp")
    direct = report.load_search(uri, experiment="tiny-exp")
    # The imported copy holds the same trials, statuses, metrics and front as the direct one.
    def content(search):
        return sorted((r["trial_id"], r["status"], r["reason"], r["pareto"], json.dumps(r["arch"], sort_keys=True),
                       sorted(r["metrics"].items())) for r in search.rows)
    assert content(imported) == content(direct)
    assert imported.hypervolume == pytest.approx(HYPERVOLUME)
    client = MlflowClient(store)
    hv = client.get_metric_history(imported.parent_run_id, "hypervolume")
    assert max(hv, key=lambda m: m.step).value == pytest.approx(HYPERVOLUME)
    baseline = next(r for r in imported.rows if r["baseline"])
    assert sorted(m.value for m in client.get_metric_history(baseline["run_id"], "val_top1")) == [0.5, 0.6, 0.7]
    files = {a.path for a in client.list_artifacts(imported.parent_run_id, "pareto")}
    assert "pareto/front.html" in files and "pareto/val_top1_vs_macs.png" in files
    with pytest.raises(ValueError, match="fallback"):
        report.import_fallback(template_db)
    # A file that continues runs of another store is refused rather than half-imported.
    continued = tmp_path / "continued.jsonl"
    continued.write_text(json.dumps({**header, "run_ids": {"parent": "0" * 32}}) + "\n"
                         + "\n".join(json.dumps(r) for r in records[1:]) + "\n")
    with pytest.raises(ValueError, match="continues runs of"):
        report.import_fallback(continued, _store(template_db, tmp_path / "other"))


def test_tracker_pickles_without_its_client(searched):
    tracker = searched[0]
    copy = pickle.loads(pickle.dumps(tracker))
    assert copy.parent_run_id == tracker.parent_run_id and copy.rows() == tracker.rows()
    assert copy.outbox._replayer is None


def test_resuming_a_run_that_does_not_exist_fails_before_anything_runs(template_db, tmp_path):
    uri = _store(template_db, tmp_path)
    tracker = MlflowTracker(uri, "e", _spec(), None, OBJECTIVES, EPOCHS, resume_parent_run_id="0" * 32)
    with pytest.raises(ValueError, match="resume_parent_run_id"):
        tracker.setup()  # what Tune calls first


def test_report_cli_refuses_a_missing_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert report.main(["--experiment", "x"]) == 2
    assert "no tracking store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates an empty store


def test_importing_a_fallback_file_twice_is_harmless(searched, template_db, tmp_path):
    fallback = searched[2] / "pending.jsonl"
    store = _store(template_db, tmp_path)
    assert report.main(["--import", str(fallback), "--tracking-uri", store]) == 0
    client = MlflowClient(store)

    def everything():
        runs = client.search_runs([client.get_experiment_by_name("offline-exp").experiment_id])
        return sorted((r.info.run_name, r.info.status, sorted(r.data.params.items()), sorted(
            (k, [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]) for k in r.data.metrics))
            for r in runs)
    once = everything()
    assert len(once) == 1 + len(TRIALS)
    assert report.main(["--import", str(fallback), "--tracking-uri", store]) == 0
    assert everything() == once


def test_an_error_drawing_the_front_is_a_warning_and_the_parent_run_ends(template_db, tmp_path, caplog):
    uri = _store(template_db, tmp_path)
    # Matplotlib cannot draw this title (an unknown TeX symbol): a real drawing error.
    tracker = MlflowTracker(uri, "bad-title", _spec(), None, OBJECTIVES, EPOCHS, run_name=r"$\nosuchsymbol$")
    tracker.setup()
    assert tracker.close() is None
    parent = MlflowClient(uri).get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert any("could not draw the Pareto plots" in r.getMessage() and "nosuchsymbol" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("where, what", [
    ("sqlite:////proc/no/such/dir/x.db", "FileNotFoundError"),
    ("http://127.0.0.1:{port}", "ConnectionRefusedError"),
])
def test_an_unusable_tracking_store_stops_the_search_before_ray_starts(where, what, digits, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = where.format(port=free_port())
    spec = demo_spec(tmp_path, digits, "nostore", num_samples=1, epochs=1, tracking_uri=uri)
    ray_before = ray.is_initialized()
    assert run.main([str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: `mlflow.tracking_uri` {uri}:") and what in err[0]
    assert ray.is_initialized() == ray_before  # refused before Ray was started
