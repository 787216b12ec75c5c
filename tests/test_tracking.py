"""MlflowTracker against real SQLite stores and the result format ``search.run_trial``
really reports: the store the session's tiny search filled through the CLI
(tests/conftest.py ``demo_search``), with Tune's result files of that search as the
reference (what each trial reported, epoch by epoch).

What that search does not go through on purpose -- a trial that crashes, one a scheduler
stops, a tracking server that is down, a resumed search -- this module makes in a real Tune
run of its own that replays what the search's trials reported (``search_utils.replay``).
Fronts and hypervolumes are worked out from the reported numbers by brute force.
"""
from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import pytest

import search_utils
from cluster_utils import free_port
from search_utils import demo_spec, mlflow_runs, non_dominated, replay, run_cli
from tntsearch import report, run
from tntsearch.tracking import (
    MlflowTracker,
    TAG_ARCH,
    TAG_CHECKPOINT_URI,
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

ray.cloudpickle.register_pickle_by_value(search_utils)  # not importable on Ray workers

EPOCHS = 2  # of the trackers that log no trial
OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 4e6)]


def _spec(name="tiny"):
    return {"name": name, "objectives": [{"metric": m, "mode": d, "ref": r} for m, d, r in OBJECTIVES],
            "search": {"num_samples": 1, "max_concurrent": 2}, "train": {"epochs": EPOCHS, "lr": 0.002}}


def _hypervolume(points, objectives) -> float:
    """The area that (val_top1 max, macs min) points dominate up to the reference point,
    summed as a staircase: from each front point's MACs to the next one's (or the reference),
    the accuracy above the reference that it reaches."""
    (_, _, acc_ref), (_, _, macs_ref) = ((o.metric, o.mode, o.ref) for o in objectives)
    front = sorted((m, a) for a, m in points if a > acc_ref and m < macs_ref)
    front = [p for p in front if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in front)]
    return sum((nxt - m) * (a - acc_ref) for (m, a), nxt in zip(front, [m for m, _ in front[1:]] + [macs_ref]))


def _expected_front(points: dict[str, tuple[float, float]], objectives) -> tuple[set[str], float]:
    return non_dominated(points), _hypervolume(list(points.values()), objectives)


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


# ---------------------------------------------------------------------------------------
# The demo search's own store, as the CLI's tracker left it


def _demo_children(demo) -> dict[str, object]:
    """The demo search's child runs by Ray trial id."""
    client = MlflowClient(demo.tracking_uri)
    return {c.data.tags["ray.trial_id"]: c for c in _children(client, demo.parent_run_id)}


def test_every_trial_has_one_child_run_with_all_its_records(demo_search):
    demo = demo_search
    client = MlflowClient(demo.tracking_uri)
    children = _demo_children(demo)
    assert set(children) == set(demo.results) and len(children) == len(_children(client, demo.parent_run_id))
    assert demo.infeasible() and len(demo.trained()) >= 2
    limit = demo.spec.constraints.max_macs
    for tid, run in children.items():
        last = demo.last(tid)
        assert run.data.tags[TAG_STATUS] == demo.status(tid)
        p = run.data.params
        assert {k: p[k] for k in last["arch"]} == {
            k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in last["arch"].items()}
        assert json.loads(run.data.tags[TAG_ARCH]) == last["arch"]
        assert run.data.metrics["macs"] == last["macs"] and run.data.metrics["params"] == last["params"]
        assert run.data.tags.get("baseline", "") == last["baseline"]
        if last["feasible"] == 0:
            assert run.data.metrics["feasible"] == 0 and run.data.metrics["violation"] == last["violation"] > 0
            # The search fills val_top1 with its reference for the sampler: not a measurement.
            assert last["val_top1"] == 0.0 and "val_top1" not in run.data.metrics and "train_loss" not in run.data.metrics
            assert run.data.metrics["constraint_max_macs"] == last["constraint_max_macs"]
            assert run.data.tags["infeasible_reason"] == f"max_macs +{100 * (last['macs'] - limit) / limit:.3g}%"
            assert "throughput" not in run.data.metrics  # NaN (never measured): not logged
            assert TAG_CHECKPOINT_URI not in run.data.tags
            continue
        rows = demo.results[tid]
        assert [r["epoch"] for r in rows] == list(range(1, demo.spec.train.epochs + 1))
        for metric in ("val_top1", "train_loss", "val_loss", "val_top5", "lr", "images_per_s"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted((m.step, m.value) for m in history) == [(r["epoch"], r[metric]) for r in rows], metric
        assert run.data.metrics["epochs_done"] == len(rows)
        assert run.data.metrics["throughput"] == last["throughput"] > 0
        assert run.data.tags[TAG_CHECKPOINT_URI] == last["checkpoint_path"]  # the last epoch's (local storage: a path)
    assert {demo.last(t)["baseline"] for t in demo.results} >= {"tiny_vit", "tiny_tnt"}
    # Two trials really ran at the same time (their child runs overlap).
    spans = sorted((c.info.start_time, c.info.end_time) for c in children.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    # One database only, at the absolute path: no stray store under the trial directories,
    # and no fallback file: everything was delivered.
    assert [p.name for p in demo.spec_path.parent.rglob("*.db")] == ["mlflow.db"]
    assert not list(demo.spec_path.parent.rglob("mlflow-pending*"))


def test_front_tags_and_hypervolume_of_the_demo_search(demo_search):
    demo = demo_search
    points = {t: (demo.last(t)["val_top1"], demo.last(t)["macs"]) for t in demo.trained()}
    _check_front(demo.tracking_uri, demo.parent_run_id, points, demo.spec.objectives,
                 {t: demo.status(t) for t in demo.results})


def test_parent_has_the_spec_settings_and_the_front_pictures(demo_search):
    demo, spec = demo_search, demo_search.spec
    client = MlflowClient(demo.tracking_uri)
    parent = client.get_run(demo.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == spec.name
    assert parent.data.params["train.lr"] == str(spec.train.lr) and parent.data.params["search.max_concurrent"] == "2"
    assert json.loads(parent.data.params["tntsearch.objectives"]) == [[o.metric, o.mode, o.ref] for o in spec.objectives]
    assert parent.data.tags["tntsearch.role"] == "search"
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/val_top1_vs_macs.png", "pareto/val_top1_vs_params.png", "pareto/val_top1_vs_throughput.png",
            "pareto/front.html", "pareto/front.json"} <= files
    local = Path(client.download_artifacts(parent.info.run_id, "pareto/val_top1_vs_macs.png"))
    assert local.read_bytes()[:4] == b"\x89PNG"
    points = {t: (demo.last(t)["val_top1"], demo.last(t)["macs"]) for t in demo.trained()}
    on_front, hypervolume = _expected_front(points, spec.objectives)
    front = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto/front.json")).read_text())
    assert front["hypervolume"] == pytest.approx(hypervolume) and {r["trial_id"] for r in front["front"]} == on_front
    spec_files = {a.path for a in client.list_artifacts(parent.info.run_id, "spec")}
    assert spec_files == {"spec/spec.json", f"spec/{demo.spec_path.name}"}
    # Artifacts live beside the database, not in whatever directory the driver ran from.
    assert parent.info.artifact_uri.startswith((demo.spec_path.parent / "mlartifacts").as_uri())


# ---------------------------------------------------------------------------------------
# The demo search's trials replayed by a Tune run of this module, with a crash, a trial a
# scheduler stops, and a second tracker towards a server that is down


class StopPruned(FIFOScheduler):
    """A scheduler decision like ASHA's: stop the trial named ``pruned`` after its first epoch."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config["name"] == "pruned" and result.get("epoch", 0) >= 1:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def _replays(demo) -> dict[str, dict]:
    """Replay configs by name: every demo trial by its id; ``crash`` (the first trained
    trial's results, raising after epoch 1) and ``pruned`` (the last one's, stopped after
    epoch 1)."""
    trained = demo.trained()
    return {**{t: {"reported": demo.reported(t)} for t in demo.results},
            "crash": {"reported": demo.reported(trained[0]), "fail_after": 1},
            "pruned": {"reported": demo.reported(trained[-1])}}


def run_replay(demo, trackers, storage: Path, names=None):
    configs = [{"name": n, **c} for n, c in _replays(demo).items() if names is None or n in names]
    tuner = tune.Tuner(
        replay,
        param_space=tune.grid_search(configs),
        tune_config=tune.TuneConfig(max_concurrent_trials=2, scheduler=StopPruned(), reuse_actors=True),
        run_config=tune.RunConfig(name="t", storage_path=str(storage), callbacks=list(trackers), verbose=0),
    )
    return {r.metrics["trial_id"]: r.config["name"] for r in tuner.fit()}


def _replay_expectations(demo):
    """(status, the last (val_top1, macs) it reported or None) per replayed name."""
    out = {t: (demo.status(t), (demo.last(t)["val_top1"], demo.last(t)["macs"])) for t in demo.results}
    first = demo.results[demo.trained()[-1]][0]
    out.update(crash=("failed", None), pruned=("stopped_early", (first["val_top1"], first["macs"])))
    return out


@pytest.fixture(scope="module")
def replayed(ray_session, demo_search, template_db, tmp_path_factory):
    """The replay logged twice: into an embedded SQLite store, and towards a tracking server
    that is down (nothing listens on the port), which must leave a fallback file."""
    workdir = tmp_path_factory.mktemp("run")
    spec = demo_search.spec.model_dump(mode="json")
    uri = _store(template_db, workdir)
    objectives, epochs = demo_search.spec.objectives, demo_search.spec.train.epochs
    tracker = MlflowTracker(uri, "tiny-exp", {**spec, "name": "tiny"}, None, objectives, epochs, final_retry_s=5)
    offline = MlflowTracker(f"http://127.0.0.1:{free_port()}", "offline-exp", {**spec, "name": "offline"}, None,
                            objectives, epochs, fallback_path=workdir / "pending.jsonl", final_retry_s=1.0,
                            max_backoff_s=0.5)
    names = run_replay(demo_search, [tracker, offline], workdir / "ray_results")
    expected = _replay_expectations(demo_search)
    return {"tracker": tracker, "uri": uri, "workdir": workdir, "names": names, "offline": offline,
            "demo": demo_search, "expected": expected,
            "points": {n: p for n, (status, p) in expected.items() if status in ("completed", "stopped_early")}}


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


def test_statuses_and_failure_reason(replayed):
    tracker, uri, names = replayed["tracker"], replayed["uri"], replayed["names"]
    client = MlflowClient(uri)
    children = _children(client, tracker.parent_run_id)
    assert sorted(names[r.data.tags["ray.trial_id"]] for r in children) == sorted(replayed["expected"])
    assert tracker.pending == 0 and tracker.undeliverable == []
    for run in children:
        name = names[run.data.tags["ray.trial_id"]]
        assert run.data.tags[TAG_STATUS] == replayed["expected"][name][0], name
        assert run.info.status == ("FAILED" if name == "crash" else "FINISHED")
        if name == "crash":
            assert run.data.tags[TAG_REASON] == "ValueError: boom at epoch 2"
            error_txt = client.download_artifacts(run.info.run_id, "error.txt")
            assert "boom at epoch 2" in Path(error_txt).read_text()
            assert run.data.metrics["epochs_done"] == 1
        else:
            assert TAG_REASON not in run.data.tags
        if name == "pruned":  # the model as it stands: its first epoch
            history = client.get_metric_history(run.info.run_id, "val_top1")
            assert [(m.step, m.value) for m in history] == [(1, replayed["points"]["pruned"][0])]
            assert run.data.metrics["epochs_done"] == 1


def _check_front(uri, parent_id, points, objectives, statuses, names=None):
    """The children's front tags, the parent's hypervolume history and counts, against
    the front and hypervolume of ``points`` (name -> (val_top1, macs)) worked out here."""
    client = MlflowClient(uri)
    on_front, hypervolume = _expected_front(points, objectives)
    children = _children(client, parent_id)
    for run in children:
        name = (names or {}).get(run.data.tags["ray.trial_id"], run.data.tags["ray.trial_id"])
        assert run.data.tags[TAG_PARETO] == ("true" if name in on_front else "false"), name
    hv = sorted(client.get_metric_history(parent_id, "hypervolume"), key=lambda m: m.step)
    assert [m.step for m in hv] == list(range(1, len(statuses) + 1))
    assert hv[-1].value == pytest.approx(hypervolume) and hypervolume > 0
    assert all(b.value >= a.value for a, b in zip(hv, hv[1:]))
    parent = client.get_run(parent_id)
    assert parent.data.metrics["front_size"] == len(on_front)
    for status in ("completed", "stopped_early", "infeasible", "failed"):
        assert parent.data.metrics[f"trials_{status}"] == list(statuses.values()).count(status), status


def test_front_tags_and_hypervolume_on_the_parent(replayed):
    tracker = replayed["tracker"]
    _check_front(replayed["uri"], tracker.parent_run_id, replayed["points"], replayed["demo"].spec.objectives,
                 {n: status for n, (status, _) in replayed["expected"].items()}, replayed["names"])
    on_front, _ = _expected_front(replayed["points"], replayed["demo"].spec.objectives)
    assert {replayed["names"][r["trial_id"]] for r in tracker.front()} == on_front


def test_report_rebuilds_the_front_from_mlflow(replayed, tmp_path, capsys):
    tracker, uri, names, points = replayed["tracker"], replayed["uri"], replayed["names"], replayed["points"]
    on_front, hypervolume = _expected_front(points, replayed["demo"].spec.objectives)
    search = report.load_search(uri, experiment="tiny-exp")
    assert search.parent_run_id == tracker.parent_run_id
    assert search.hypervolume == pytest.approx(hypervolume)
    front = report.load_search(uri, run_id=tracker.parent_run_id).front
    assert {names[r["trial_id"]] for r in front} == on_front
    assert [points[names[r["trial_id"]]][0] for r in front] == sorted((points[n][0] for n in on_front), reverse=True)
    demo = replayed["demo"]
    arch = {**{t: demo.last(t)["arch"] for t in demo.results}, "pruned": demo.last(demo.trained()[-1])["arch"]}
    assert front[0]["arch"] == arch[names[front[0]["trial_id"]]] and front[0]["run_id"]
    assert report.main(["--experiment", "tiny-exp", "--tracking-uri", uri, "--out", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert f"Pareto front ({len(on_front)} trials)" in out and "tiny_vit" in out and "stopped_early" in out
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == [
        "front.html", "report.html", "val_top1_vs_macs.png", "val_top1_vs_params.png", "val_top1_vs_throughput.png"]
    assert report.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`experiment` 'nope' not found" in err[0]


def test_resume_adopts_the_earlier_trials(replayed, tmp_path):
    tracker, workdir, demo = replayed["tracker"], replayed["workdir"], replayed["demo"]
    shutil.copy(workdir / "mlflow.db", tmp_path / "mlflow.db")
    uri2 = prepare_store(resolve_tracking_uri(None, tmp_path))
    resumed = MlflowTracker(uri2, "tiny-exp", _spec(), None, demo.spec.objectives, demo.spec.train.epochs,
                            resume_parent_run_id=tracker.parent_run_id, final_retry_s=5)
    again = demo.trained()[0]  # a point the front already has: the hypervolume stays
    run_replay(demo, [resumed], tmp_path / "ray_results", names=(again,))
    assert resumed.parent_run_id == tracker.parent_run_id
    client = MlflowClient(uri2)
    n = len(replayed["expected"])
    assert len(_children(client, tracker.parent_run_id)) == n + 1
    hv = client.get_metric_history(tracker.parent_run_id, "hypervolume")
    last = max(hv, key=lambda m: m.step)
    _, hypervolume = _expected_front(replayed["points"], demo.spec.objectives)
    assert last.step == n + 1 and last.value == pytest.approx(hypervolume)
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"


def test_unreachable_server_leaves_a_fallback_file_that_imports(replayed, template_db, tmp_path):
    uri, workdir, offline, demo = replayed["uri"], replayed["workdir"], replayed["offline"], replayed["demo"]
    fallback = workdir / "pending.jsonl"
    assert offline.parent_run_id is None and offline.pending > 0 and offline.fallback_path == fallback
    header, records = read_fallback(fallback)
    assert header["tracking_uri"] == offline.tracking_uri and header["delivered"] == 0
    assert len(records) == offline.pending
    assert sum(r["op"] == "start" for r in records) == 1 + len(replayed["expected"])

    store = _store(template_db, tmp_path / "later")
    assert report.main(["--import", str(fallback), "--tracking-uri", store]) == 0
    imported = report.load_search(store, experiment="offline-exp")
    direct = report.load_search(uri, experiment="tiny-exp")
    # The imported copy holds the same trials, statuses, metrics and front as the direct one.
    def content(search):
        return sorted((r["trial_id"], r["status"], r["reason"], r["pareto"], json.dumps(r["arch"], sort_keys=True),
                       sorted(r["metrics"].items())) for r in search.rows)
    assert content(imported) == content(direct)
    _, hypervolume = _expected_front(replayed["points"], demo.spec.objectives)
    assert imported.hypervolume == pytest.approx(hypervolume)
    client = MlflowClient(store)
    hv = client.get_metric_history(imported.parent_run_id, "hypervolume")
    assert max(hv, key=lambda m: m.step).value == pytest.approx(hypervolume)
    baseline = next(r for r in imported.rows if r["baseline"] == "tiny_vit")
    tiny_vit = next(t for t in demo.trained() if demo.last(t)["baseline"] == "tiny_vit")
    assert sorted((m.step, m.value) for m in client.get_metric_history(baseline["run_id"], "val_top1")) == [
        (r["epoch"], r["val_top1"]) for r in demo.results[tiny_vit]]
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


def test_tracker_pickles_without_its_client(replayed):
    tracker = replayed["tracker"]
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


def test_importing_a_fallback_file_twice_is_harmless(replayed, template_db, tmp_path):
    fallback = replayed["workdir"] / "pending.jsonl"
    store = _store(template_db, tmp_path)
    assert report.main(["--import", str(fallback), "--tracking-uri", store]) == 0
    client = MlflowClient(store)

    def everything():
        runs = client.search_runs([client.get_experiment_by_name("offline-exp").experiment_id])
        return sorted((r.info.run_name, r.info.status, sorted(r.data.params.items()), sorted(
            (k, [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]) for k in r.data.metrics))
            for r in runs)
    once = everything()
    assert len(once) == 1 + len(replayed["expected"])
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


def test_a_search_whose_records_mlflow_refuses_exits_3_naming_the_fallback_file(digits, tmp_path):
    """The CLI end to end (docs/tracking.md): someone deletes the search's parent run in
    MLflow while the search runs, so the store refuses its later records for good ("must be
    in the 'active' state", HTTP 400). The search still finishes; the CLI exits 3 naming the
    fallback file, which holds the parent's end; with the run restored, importing the file
    completes the search in MLflow."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # No machine reaches 1e12 images/s: every trial is costed, measured and infeasible; none trains.
    spec = demo_spec(tmp_path, digits, "refused", num_samples=3, epochs=1, max_concurrent=1, tracking_uri=store,
                     constraints={"max_macs": 3.0e6, "min_throughput": 1e12})
    client = MlflowClient(store)
    deleted = []

    def delete_the_parent(line: str) -> None:  # after the first of three trials: two are to come
        if not deleted and ": infeasible" in line:
            deleted.append(mlflow_runs(store, "refused")[0][0].info.run_id)
            client.delete_run(deleted[0])

    rc, out = run_cli(spec, tmp_path, on_line=delete_the_parent)
    fallback = tmp_path / "ray_results" / "refused" / "mlflow-pending.jsonl"
    assert deleted and rc == 3, out[-3000:]
    assert "[3/3 done]" in out and f"did not take are in {fallback}" in out
    header, records = read_fallback(fallback)
    assert "must be in the 'active' state" in header["rejected"]["parent"]
    assert any(r["op"] == "end" and r["key"] == "parent" and r["status"] == "FINISHED" for r in records)

    client.restore_run(deleted[0])
    assert report.import_fallback(fallback) == deleted[0]
    parents, children = mlflow_runs(store, "refused")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len({c.data.tags["ray.trial_id"] for c in children}) == len(children) == 3
    assert all(c.data.tags[TAG_STATUS] == "infeasible" and c.info.status == "FINISHED" for c in children)


@pytest.mark.parametrize("candidates", [False, True], ids=["train_each", "supernet"])
def test_a_baseline_proposed_again_is_one_baseline(candidates):
    """NSGA-II proposes a baseline's architecture again (800 supernet candidates made seven
    `tiny_vit` child runs): the first trial with a baseline's name stands for it; a later one
    is an ordinary trial, so the baseline gets one row, one child run and one place."""
    from types import SimpleNamespace

    from tntsearch.tracking import TAG_BASELINE
    from tntsearch.tracking.trials import CandidateTable, TrialTable

    records: list[dict] = []
    objectives = [("val_top1", "max", 0.0), ("macs", "min", 8e6)]
    table = CandidateTable(objectives, 1, records.append) if candidates else TrialTable(objectives, 1, records.append)
    arch = {"outer_dim": 64, "depth": 4, "inner_dim": 8, "words": 4, "inner_heads": 1, "se": "none", "tnt_blocks": []}
    for tid in ("t0", "t1", "t2"):
        table.result(SimpleNamespace(trial_id=tid), {"arch": arch, "baseline": "tiny_vit", "feasible": 1, "epoch": 1,
                                                     "val_top1": 80.0, "macs": 1e6})
    assert [r["baseline"] for r in sorted(table.rows({}), key=lambda r: r["trial_id"])] == ["tiny_vit", "", ""]
    if candidates:
        table.finalize({})
        promoted = [r for r in records if r.get("op") == "start" and r["tags"].get(TAG_BASELINE) == "tiny_vit"]
        assert len(promoted) == 1
