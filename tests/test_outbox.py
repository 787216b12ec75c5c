"""The tracker's outbox on its own (no Ray): in-order delivery into a real SQLite store,
buffering and the fallback file while the store cannot be opened, delivery once it can.

The store is "down" while a plain file stands where its folder should be (SQLite cannot
open the database: a transient failure) and "back" once the folder and a database exist.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from tntsearch.tracking.outbox import PARENT, Outbox, read_fallback
from tntsearch.tracking.store import prepare_store, resolve_tracking_uri

from mlflow.tracking import MlflowClient  # noqa: E402  (after tntsearch.tracking: telemetry off)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """One empty store; copied wherever a test needs one (MLflow's schema takes seconds)."""
    uri = prepare_store(resolve_tracking_uri(None, tmp_path_factory.mktemp("template")))
    return Path(uri[len("sqlite:///"):])


def _search(outbox: Outbox, experiment: str, trials: int = 2) -> None:
    """What a tracker queues for a tiny search: an experiment, a parent, trials with metrics."""
    outbox.add({"op": "experiment", "name": experiment})
    outbox.add({"op": "start", "key": PARENT, "parent": None, "name": "search", "tags": {"tntsearch.role": "search"}})
    for i in range(trials):
        key = f"trial:t{i}"
        outbox.add({"op": "start", "key": key, "parent": PARENT, "name": f"trial {i}", "tags": {"ray.trial_id": f"t{i}"}})
        outbox.add({"op": "log", "key": key, "metrics": [["val_top1", 0.1 * e + i, e, 1000 + e] for e in (1, 2)],
                    "params": {"depth": str(i)}, "tags": {"status": "completed"}})
        outbox.add({"op": "end", "key": key, "status": "FINISHED"})
    outbox.add({"op": "end", "key": PARENT, "status": "FINISHED"})


def _children(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''")
    return {r.data.tags["ray.trial_id"]: r for r in runs}


def test_records_arrive_in_order_and_are_forgotten(template_db, tmp_path):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = resolve_tracking_uri(None, tmp_path)
    outbox = Outbox(uri, tmp_path / "pending.jsonl")
    _search(outbox, "ok")
    assert outbox.pending == 9 and [r["seq"] for r in outbox.records] == list(range(9))
    assert outbox.flush()
    assert outbox.pending == 0 and outbox.delivered == 9 and outbox.undeliverable == []
    assert not (tmp_path / "pending.jsonl").exists()
    children = _children(uri, "ok")
    assert sorted(children) == ["t0", "t1"]
    client = MlflowClient(uri)
    history = client.get_metric_history(children["t1"].info.run_id, "val_top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.1), (2, 1.2)]
    assert children["t1"].data.params["depth"] == "1" and children["t1"].info.status == "FINISHED"
    assert client.get_run(outbox.run_ids[PARENT]).info.status == "FINISHED"


def test_an_unreachable_store_keeps_everything_on_disk_until_it_is_back(template_db, tmp_path):
    later = tmp_path / "not-yet"
    later.write_text("a file where the store's folder belongs")
    uri = resolve_tracking_uri(None, later)
    outbox = Outbox(uri, tmp_path / "pending.jsonl", meta={"experiment": "later"}, max_backoff_s=0.2)
    _search(outbox, "later")
    assert not outbox.flush()
    header, records = read_fallback(tmp_path / "pending.jsonl")
    assert header["tracking_uri"] == uri and header["experiment"] == "later" and header["delivered"] == 0
    assert records == list(outbox.records) and len(records) == 9
    assert not outbox.flush()  # within the back-off: not even tried
    # Pickled with Tune's experiment state: the records travel, the client does not.
    copy = pickle.loads(pickle.dumps(outbox))
    assert copy._replayer is None and list(copy.records) == records

    later.unlink()
    later.mkdir()
    shutil.copy(template_db, later / "mlflow.db")
    assert copy.drain(timeout_s=10)
    assert copy.pending == 0 and copy.delivered == 9
    assert not (tmp_path / "pending.jsonl").exists()  # delivered: nothing left to import
    assert sorted(_children(uri, "later")) == ["t0", "t1"]


def test_state_round_trip_continues_the_sequence(tmp_path):
    outbox = Outbox(resolve_tracking_uri(None, tmp_path / "nowhere"), tmp_path / "p.jsonl")
    _search(outbox, "x", trials=1)
    restored = Outbox(outbox.tracking_uri, tmp_path / "p.jsonl")
    restored.set_state(outbox.get_state())
    restored.add({"op": "end", "key": PARENT, "status": "KILLED"})
    assert [r["seq"] for r in restored.records] == list(range(7))


def test_a_refused_record_and_the_rest_of_its_run_go_to_the_fallback_file(template_db, tmp_path):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = resolve_tracking_uri(None, tmp_path)
    outbox = Outbox(uri, tmp_path / "pending.jsonl")
    _search(outbox, "refused")
    outbox.flush()
    # MLflow refuses a param that changes value (HTTP 400): not worth retrying.
    outbox.add({"op": "log", "key": "trial:t0", "params": {"depth": "7"}})
    outbox.add({"op": "log", "key": "trial:t0", "metrics": [["val_top1", 0.9, 3, 1003]]})
    outbox.add({"op": "log", "key": "trial:t1", "metrics": [["val_top1", 0.9, 3, 1003]]})
    assert outbox.flush()  # nothing left to retry ...
    # ... but nothing dropped: both records of t0 are kept on disk, t1's got through.
    assert [r["key"] for r in outbox.undeliverable] == ["trial:t0", "trial:t0"]
    assert "log record refused" in outbox.rejected["trial:t0"] and "depth" in outbox.rejected["trial:t0"]
    header, records = read_fallback(tmp_path / "pending.jsonl")
    assert records == outbox.undeliverable and header["run_ids"] == outbox.run_ids
    children = _children(uri, "refused")
    assert children["t0"].data.params["depth"] == "0" and children["t0"].data.metrics["val_top1"] == 0.2
    assert children["t1"].data.metrics["val_top1"] == 0.9


def test_a_restored_outbox_takes_the_newer_file_and_delivers_each_record_once(template_db, tmp_path):
    """A driver that died during an outage, resumed from Tune's last checkpoint (which
    holds fewer records than the fallback file), then resumed from it once more."""
    down = tmp_path / "store"
    down.write_text("the store is down")
    uri = resolve_tracking_uri(None, down)
    fallback = tmp_path / "ray_results" / "mlflow-pending.jsonl"
    outbox = Outbox(uri, fallback)
    outbox.add({"op": "experiment", "name": "restored"})
    outbox.add({"op": "start", "key": PARENT, "parent": None, "name": "search", "tags": {}})
    checkpoint = outbox.get_state()  # Tune's last experiment checkpoint
    outbox.add({"op": "start", "key": "trial:t0", "parent": PARENT, "name": "t0", "tags": {"ray.trial_id": "t0"}})
    assert not outbox.flush()  # the outage: the file is written ...
    outbox.add({"op": "log", "key": "trial:t0", "metrics": [["val_top1", 0.5, 1, 2000]]})  # ... and appended to
    assert len(read_fallback(fallback)[1]) == 4
    # The driver dies here. The store comes back; the search is resumed from the checkpoint.
    down.unlink()
    down.mkdir()
    shutil.copy(template_db, down / "mlflow.db")
    restored = Outbox(uri, fallback)
    restored.set_state(checkpoint)
    assert restored.pending == 4 and restored.drain(timeout_s=10)
    client = MlflowClient(uri)
    children = _children(uri, "restored")
    assert list(children) == ["t0"]
    assert [m.value for m in client.get_metric_history(children["t0"].info.run_id, "val_top1")] == [0.5]
    assert not fallback.exists()  # everything is in the store
    again = Outbox(uri, fallback)
    again.set_state(checkpoint)  # restored once more from the same checkpoint: nothing doubles
    assert again.drain(timeout_s=10) and again.skipped == 1  # the parent's start; the experiment is looked up
    assert len(client.search_runs([children["t0"].info.experiment_id])) == 2
