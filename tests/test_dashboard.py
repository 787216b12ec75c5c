"""What a user sees: a real ``mlflow server`` filled by MlflowTracker, read back through
the REST API and rendered by a headless Chromium.

The tracker is set up while the server is still down (its records are buffered and kept in
a fallback file), then the server comes up and the trials arrive: everything arrives once,
and the fallback file goes away. A server outage is not something the session's tiny search
(tests/conftest.py ``demo_search``) goes through, so the tracker here is driven through its
Tune hooks with what that search's trials reported (``search_utils.log_replayed``): the real
result format, without a Ray of its own. The server runs through ``mlflow_utils``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from mlflow_utils import MlflowServer
from search_utils import log_replayed, non_dominated
from tntsearch.tracking import TAG_PARETO, TAG_STATUS, MlflowTracker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--virtual-time-budget=5000", "--window-size=1400,1000",
]
SEARCH_NAME = "dash-search-7f3"
EXPERIMENT = "dashboard-exp"


@pytest.fixture(scope="module")
def dashboard(demo_search, tmp_path_factory):
    base = tmp_path_factory.mktemp("dashboard")
    server = MlflowServer(base)
    url = server.url
    spec = demo_search.spec
    tracker = MlflowTracker(url, EXPERIMENT, {"name": SEARCH_NAME, "train": {"epochs": spec.train.epochs}}, None,
                            spec.objectives, spec.train.epochs, fallback_path=base / "pending.jsonl",
                            final_retry_s=30, max_backoff_s=1.0, plot_every_s=3600)  # pictures once, at the end
    tracker.setup()  # the server is not up yet: buffered, and kept on disk
    buffered_while_down = (tracker.pending, tracker.parent_run_id, (base / "pending.jsonl").is_file())
    try:
        server.start(keep_port=True)  # the tracker already holds its address
        log_replayed(tracker, spec, [(t, demo_search.reported(t)) for t in demo_search.results])
        yield {"url": url, "tracker": tracker, "base": base, "buffered_while_down": buffered_while_down,
               "demo": demo_search}
    finally:
        server.stop()


def _api(url: str, path: str, **kw):
    r = requests.post(f"{url}/api/2.0/mlflow/{path}", json=kw, timeout=30) if kw else requests.get(f"{url}/api/2.0/mlflow/{path}", timeout=30)
    r.raise_for_status()
    return r.json()


def test_records_buffered_while_the_server_was_down_all_arrive(dashboard):
    pending, parent, fallback_written = dashboard["buffered_while_down"]
    assert pending > 0 and parent is None and fallback_written
    tracker = dashboard["tracker"]
    assert tracker.pending == 0 and tracker.undeliverable == [] and tracker.parent_run_id
    assert not (dashboard["base"] / "pending.jsonl").exists()  # delivered: nothing left to import


def test_rest_api_answers_with_the_parent_and_children(dashboard):
    url, tracker = dashboard["url"], dashboard["tracker"]
    exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": EXPERIMENT}, timeout=30).json()
    exp_id = exp["experiment"]["experiment_id"]
    runs = _api(url, "runs/search", experiment_ids=[exp_id], max_results=100)["runs"]
    parents = [r for r in runs if r["info"]["run_name"] == SEARCH_NAME]
    assert len(parents) == 1 and parents[0]["info"]["run_id"] == tracker.parent_run_id  # created once, not twice
    children = [r for r in runs if {"key": "mlflow.parentRunId", "value": tracker.parent_run_id} in r["data"].get("tags", [])]
    demo = dashboard["demo"]
    assert len(children) == len(demo.results)
    tags = {t["ray.trial_id"]: t for t in ({t["key"]: t["value"] for t in c["data"]["tags"]} for c in children)}
    assert set(tags) == set(demo.results)
    on_front = non_dominated({t: (demo.last(t)["val_top1"], demo.last(t)["macs"]) for t in demo.trained()})
    for trial, t in tags.items():
        assert t[TAG_STATUS] == demo.status(trial), trial
        assert t[TAG_PARETO] == ("true" if trial in on_front else "false"), trial
    files = _api(url, f"artifacts/list?run_id={tracker.parent_run_id}&path=pareto")["files"]
    assert {"pareto/front.html", "pareto/val_top1_vs_macs.png"} <= {f["path"] for f in files}
    png = requests.get(f"{url}/get-artifact", params={"path": "pareto/val_top1_vs_macs.png", "run_uuid": tracker.parent_run_id}, timeout=30)
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    page = requests.get(f"{url}/get-artifact", params={"path": "pareto/front.html", "run_uuid": tracker.parent_run_id}, timeout=60).text
    assert "Plotly.newPlot" in page and "baseline: tiny_vit" in page  # the baseline that trains (2.57 M MACs)
    for trial in demo.trained():  # hover: the architecture of every trained trial
        blocks = demo.last(trial)["arch"]["tnt_blocks"]
        assert f"tnt_blocks: {','.join(map(str, blocks)) or '(none)'}" in page, trial


def _chromium(url: str, workdir: Path, name: str, what: str) -> str | Path:
    """The DOM after 5 s of virtual time (``what="dom"``) or a screenshot's path.

    One page per process, one process at a time, with a fresh profile: with --dump-dom and
    --screenshot together, or with several browsers at once against the single-worker
    server, the runs page sometimes never finishes its virtual time; a stuck run is retried
    once.
    """
    shot = workdir / f"{name}.png"
    for attempt in range(2):
        profile = workdir / f"profile-{name}-{attempt}"
        out = ["--dump-dom"] if what == "dom" else [f"--screenshot={shot}"]
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *out, url],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helpers: our own group
            proc.communicate()
            continue
        assert proc.returncode == 0, f"chromium exited with {proc.returncode} on {url}"
        return stdout if what == "dom" else shot
    raise AssertionError(f"chromium did not finish {url} twice in a row")


@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (Debian package `chromium`; `make setup` installs it)")
    return CHROMIUM


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_shows_the_search_and_its_pareto_pages(dashboard, chromium, tmp_path):
    url, tracker = dashboard["url"], dashboard["tracker"]
    exp_id = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": EXPERIMENT},
                          timeout=30).json()["experiment"]["experiment_id"]
    runs = f"{url}/#/experiments/{exp_id}/runs"
    picture = f"{runs}/{tracker.parent_run_id}/artifacts/pareto/val_top1_vs_macs.png"
    assert SEARCH_NAME in _chromium(runs, tmp_path, "runs", "dom")  # the parent run is in the runs table
    assert _is_png(_chromium(runs, tmp_path, "runs", "screenshot"))
    # The front's picture is shown on the parent run's artifact page.
    assert 'alt="pareto/val_top1_vs_macs.png"' in _chromium(picture, tmp_path, "picture", "dom")
    assert _is_png(_chromium(picture, tmp_path, "picture", "screenshot"))
