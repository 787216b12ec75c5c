"""``tntsearch report`` writes one self-contained page, and a headless Chromium finds in it
the front's pictures, the hypervolume over time and the trial table, whose filters work.

The search behind it is real but untrained: a Ray Tune run of a trainable that reports like
``tntsearch.search`` does (two feasible architectures and one over the MACs limit), logged
by the real ``MlflowTracker`` into a SQLite store.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from tntsearch.tracking import TELEMETRY_ENV, MlflowTracker, prepare_store

import ray  # noqa: E402  (after tntsearch.tracking: MLflow telemetry is off before Ray starts)
from ray import tune  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--virtual-time-budget=5000"]
OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 4e6)]
TRIALS = [
    dict(baseline="tiny_vit", inner_dim=8, macs=1e6, acc=70.0, feasible=1),
    dict(baseline="", inner_dim=16, macs=2e6, acc=80.0, feasible=1),
    dict(baseline="", inner_dim=32, macs=5e6, acc=None, feasible=0),
]


def trainable(config):
    config = config["trial"]
    arch = {"outer_dim": 64, "depth": 2, "inner_dim": config["inner_dim"], "words": 4, "inner_heads": 1,
            "se": "none", "tnt_blocks": [1]}
    base = {"arch": arch, "params": 1e5, "macs": config["macs"], "throughput": 300.0, "baseline": config["baseline"]}
    if not config["feasible"]:
        tune.report({**base, "feasible": 0, "violation": 0.25, "constraint_max_macs": 0.25, "epoch": 0})
        return
    tune.report({**base, "feasible": 1, "violation": 0.0, "epoch": 1, "val_top1": config["acc"], "val_loss": 1.0})


@pytest.fixture(scope="module")
def report(ray_session, tmp_path_factory):
    """The search logged to MLflow, then ``tntsearch report`` on it: (its output, the page)."""
    base = tmp_path_factory.mktemp("report")
    uri = prepare_store(f"sqlite:///{base / 'mlflow.db'}")
    tracker = MlflowTracker(tracking_uri=uri, experiment="report-page", spec_dict={"name": "report-page"},
                            spec_path=None, objectives=OBJECTIVES, epochs=1)
    tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(TRIALS)},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name="report-page", storage_path=str(base / "ray"), callbacks=[tracker], verbose=0),
    ).fit()
    env = {**os.environ, **TELEMETRY_ENV}
    out = subprocess.run([sys.executable, "-m", "tntsearch.report", "--experiment", "report-page", "--tracking-uri", uri,
                          "--out", str(base / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout, base


class _ScriptTags(HTMLParser):
    """The ``src`` of every ``<script>`` tag (script bodies are not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script" and dict(attrs).get("src"):
            self.sources.append(dict(attrs)["src"])


def _dom(url: str, profile) -> str:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (Debian package `chromium`; `make setup` installs it)")
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_prints_the_path_of_one_self_contained_page(report):
    stdout, base = report
    page = base / "out" / "report.html"
    assert stdout.splitlines()[-1] == f"report: {page}"
    text = page.read_text()
    scripts = _ScriptTags()
    scripts.feed(text)
    assert scripts.sources == [] and "plotly.js v" in text  # plotly.js is inside the page, nothing loaded
    assert text.count("Plotly.newPlot") >= 4  # three fronts (macs, params, throughput) and the hypervolume


@pytest.mark.slow
def test_browser_finds_the_front_and_the_trial_table(report, tmp_path):
    _, base = report
    dom = _dom((base / "out" / "report.html").as_uri(), tmp_path / "p1")
    front = dom.split("<section id=\"front-pictures\">", 1)[1].split("</section>", 1)[0]
    assert front.count("class=\"main-svg\"") >= 3  # plotly drew the front pictures
    assert "fraction of the reference box" in dom  # the hypervolume plot
    rows = re.findall(r"<tr data-status=\"(\w+)\" data-front=\"(\d)\"( style=\"\")?>", dom)
    assert sorted(r[0] for r in rows) == ["completed", "completed", "infeasible"]
    assert sorted(r[1] for r in rows) == ["0", "1", "1"]
    assert "tiny_vit</b>" in dom and "on the front" in dom  # the baseline's place
    # The filters, set through the address: only the infeasible trial stays visible.
    dom = _dom((base / "out" / "report.html").as_uri() + "#status=infeasible", tmp_path / "p2")
    visible = re.findall(r"<tr data-status=\"(\w+)\" data-front=\"\d\"(?: style=\"\")?>", dom)
    assert visible == ["infeasible"]
    assert "<span id=\"shown\">1</span> of 3 shown" in dom


def test_a_supernet_search_keeps_the_front_it_chose_on_search_top1():
    """Two children at the same MACs: A leads on the selection data (search_top1), B on
    data.val. A supernet mode search chose A, so the report's front is A and its
    hypervolume A's data.val point against the reference (0 %, 8 M MACs): 80 x 6e6. The
    same children without search_top1 (train_each) give B: 85 x 6e6."""
    from tntsearch.pareto import as_objectives
    from tntsearch.report import SearchResult

    def row(tid, val, search=None):
        metrics = {"val_top1": val, "macs": 2e6, **({} if search is None else {"search_top1": search})}
        return {"trial_id": tid, "run_id": tid, "status": "completed", "baseline": "", "pareto": False, "arch": {},
                "metrics": metrics}

    objectives = as_objectives([("val_top1", "max", 0.0), ("macs", "min", 8e6)])
    supernet = SearchResult("p", "0", "s", objectives, 1, [row("A", 80.0, 90.0), row("B", 85.0, 85.0)])
    assert supernet.front_ids == {"A"}
    assert supernet.hypervolume == pytest.approx(80.0 * 6e6)
    train_each = SearchResult("p", "0", "s", objectives, 1, [row("A", 80.0), row("B", 85.0)])
    assert train_each.front_ids == {"B"}
    assert train_each.hypervolume == pytest.approx(85.0 * 6e6)
