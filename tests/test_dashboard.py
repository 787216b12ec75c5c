"""What a user sees: a real ``mlflow server`` filled by MlflowTracker, read back through
the REST API and rendered by a headless Chromium.

The tracker is set up while the server is still down (its records are buffered and kept in
a fallback file), then the server comes up and the trials arrive: everything arrives once,
and the fallback file goes away. A server outage is not something the session's tiny search
(tests/conftest.py ``demo_search``) goes through, so the tracker here is driven through its
Tune hooks with what that search's trials reported (``search_utils.log_replayed``): the real
result format, without a Ray of its own. The server runs through ``mlflow_utils``.

Supernet mode (issue 15): a parent run carrying 2,000 candidates, the session's supernet
search (``demo_supernet_search``) replayed into the same server and repeated under new trial
ids, must stay usable: its page, its ``candidates.json`` table and the table's page.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
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


# -- supernet mode: a parent with 2,000 candidates ------------------------------------------

SUPERNET_EXPERIMENT = "dashboard-supernet-exp"
MANY = 2000


def _candidates(demo, n: int) -> list[tuple[str, list[dict]]]:
    """``n`` candidates for ``log_replayed``: the supernet search's own, then its results again
    under new trial ids (Tune's ``<id>_<index>`` form) and without their baseline name, as a
    converging NSGA-II proposes the same networks again and the candidate cache answers them."""
    own = list(demo.results)
    out = []
    for k in range(n):
        tid = own[k % len(own)]
        results = demo.reported(tid)
        if k >= len(own):
            tid, results = f"{tid}_{k:05d}", [{**r, "baseline": ""} for r in results]
        out.append((tid, results))
    return out


@pytest.fixture(scope="module")
def supernet_dashboard(dashboard, demo_supernet_search):
    """Two supernet mode parents on the dashboard's server, logged by the real tracker: the
    session search's 30 candidates (``few``) and 2,000 (``many``)."""
    demo, url = demo_supernet_search, dashboard["url"]
    spec = demo.spec
    parents = {}
    for name, n in (("few", len(demo.results)), ("many", MANY)):
        tracker = MlflowTracker(url, SUPERNET_EXPERIMENT, spec.model_dump(mode="json"), demo.spec_path,
                                spec.objectives, 1, run_name=f"supernet-{n}", candidates=True, plot_every_s=3600,
                                fallback_path=dashboard["base"] / f"pending-{name}.jsonl")
        tracker.setup()
        candidates = _candidates(demo, n)
        log_replayed(tracker, spec, candidates)
        assert tracker.pending == 0 and tracker.undeliverable == []
        parents[name] = {"run_id": tracker.parent_run_id, "name": f"supernet-{n}", "candidates": candidates}
    exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": SUPERNET_EXPERIMENT},
                       timeout=30).json()
    return {"url": url, "exp_id": exp["experiment"]["experiment_id"], **parents}


def _get_table(url: str, run_id: str) -> tuple[dict, int, float]:
    """The parent's ``candidates.json`` as the dashboard downloads it: the table, its size in
    bytes and the GET's wall time."""
    tic = time.monotonic()
    r = requests.get(f"{url}/get-artifact", params={"path": "candidates.json", "run_uuid": run_id}, timeout=60)
    wall = time.monotonic() - tic
    r.raise_for_status()
    return r.json(), len(r.content), wall


def test_supernet_parent_with_2000_candidates_keeps_every_one_in_its_table(supernet_dashboard):
    url = supernet_dashboard["url"]
    sizes = {}
    for name in ("few", "many"):
        p = supernet_dashboard[name]
        listed = {f["path"]: f for f in _api(url, f"artifacts/list?run_id={p['run_id']}")["files"]}
        table, size, wall = _get_table(url, p["run_id"])
        assert int(listed["candidates.json"]["file_size"]) == size
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        fed = {tid: results[-1] for tid, results in p["candidates"]}
        assert [r["trial_id"] for r in rows] == list(fed)  # every candidate, once, none lost
        for r in rows:
            last = fed[r["trial_id"]]
            assert (r["status"], json.loads(r["arch"]), r["macs"]) == (
                "completed" if last["feasible"] == 1 else "infeasible", last["arch"], last["macs"])
        # Nothing per candidate on the parent: its metric histories stay a few points long.
        history = _api(url, f"metrics/get-history?run_id={p['run_id']}&metric_key=trials_completed")["metrics"]
        assert 1 <= len(history) <= 5, len(history)
        assert history[-1]["value"] == sum(last["feasible"] == 1 for last in fed.values())
        sizes[name] = (size, wall)
        assert wall < 5.0, f"candidates.json of {len(rows)} rows took {wall:.1f} s"
    print(f"\ncandidates.json: {len(supernet_dashboard['few']['candidates'])} rows {sizes['few'][0]} B in "
          f"{sizes['few'][1]:.2f} s; {MANY} rows {sizes['many'][0]} B in {sizes['many'][1]:.2f} s")
    # Repeats get no child run: the front and the baselines are the same as with 30.
    runs = _api(url, "runs/search", experiment_ids=[supernet_dashboard["exp_id"]], max_results=1000)["runs"]
    few, many = (sorted(r["info"]["run_name"] for r in runs if {"key": "mlflow.parentRunId", "value": parent} in
                        r["data"]["tags"]) for parent in (supernet_dashboard[n]["run_id"] for n in ("few", "many")))
    assert many == few and few


def _text(dom: str) -> str:
    """A page's visible text, one space between words."""
    dom = re.sub(r"<(script|style|svg)\b[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_browser_shows_a_supernet_parent_with_2000_candidates_and_its_table(supernet_dashboard, chromium, tmp_path):
    url, exp_id = supernet_dashboard["url"], supernet_dashboard["exp_id"]
    walls = {}
    for name in ("few", "many"):
        p = supernet_dashboard[name]
        completed = sum(results[-1]["feasible"] == 1 for _, results in p["candidates"])
        page = f"{url}/#/experiments/{exp_id}/runs/{p['run_id']}"
        tic = time.monotonic()
        text = _text(_chromium(page, tmp_path, f"parent-{name}", "dom"))
        walls[name, "page"] = time.monotonic() - tic
        assert p["name"] in text and "search.mode supernet" in text, text[:2000]  # the run, its params
        infeasible = len(p["candidates"]) - completed
        assert f"trials_completed {completed}" in text and f"trials_infeasible {infeasible}" in text
        tic = time.monotonic()
        text = _text(_chromium(f"{page}/artifacts/candidates.json", tmp_path, f"table-{name}", "dom"))
        walls[name, "table"] = time.monotonic() - tic
        first = p["candidates"][0][0]
        assert "View as table" in text and "trial_id status baseline pareto arch" in text and first in text, text[:2000]
    few = len(supernet_dashboard["few"]["candidates"])
    print(f"\nchromium, parent page: {walls['few', 'page']:.1f} s with {few} candidates, {walls['many', 'page']:.1f} s "
          f"with {MANY}; candidates.json page: {walls['few', 'table']:.1f} s, {walls['many', 'table']:.1f} s")
    # _chromium gives a stuck page a second try after 60 s: a page this slow is one that hung once.
    assert max(walls.values()) < 45, walls
