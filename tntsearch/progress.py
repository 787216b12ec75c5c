"""The live terminal view of a search: trial counts by outcome and the front so far.

A Ray Tune callback in the driver that reads the ``MlflowTracker``'s view of the trials
(the one place outcomes are decided), so the terminal and MLflow never disagree. Tune
pickles both callbacks together with the experiment, so a resumed search keeps the link.
"""
from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from tntsearch.report import front_table
from tntsearch.tracking import MlflowTracker

__all__ = ["ProgressView", "counts_line"]

_ORDER = ("completed", "stopped_early", "infeasible", "failed")


def counts_line(summary: dict[str, Any], num_samples: int) -> str:
    """``[4/10 done] running 2  completed 3  stopped early 0  infeasible 1  failed 0``."""
    done = sum(summary.get(s, 0) for s in _ORDER)
    parts = [f"{s.replace('_', ' ')} {summary.get(s, 0)}" for s in _ORDER]
    return f"[{done}/{num_samples} done] running {summary.get('running', 0)}  " + "  ".join(parts) + (
        f"  hypervolume {summary['hypervolume']:.4g}" if summary.get("front") else ""
    )


class ProgressView(Callback):
    """One line per finished trial; the front whenever it changed, at most every ``interval`` s.

    Must come after the tracker in ``callbacks`` so that it sees each outcome recorded.
    """

    def __init__(self, tracker: MlflowTracker, num_samples: int, interval: float = 30.0):
        self.tracker = tracker
        self.num_samples = num_samples
        self.interval = interval
        self._shown_front: list[str] = []
        self._shown_at = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._shown_at > self.interval:
            self._show_front()

    def on_experiment_end(self, trials, **info):
        self._show_front()

    def _finished(self, trial) -> None:
        row = next((r for r in self.tracker.rows() if r["trial_id"] == trial.trial_id), None)
        if row is None:
            return
        if row["status"] in ("failed", "infeasible"):
            detail = row["reason"] or ""
        else:
            detail = "  ".join(f"{o.metric}={row['metrics'].get(o.metric, float('nan')):.4g}" for o in self.tracker.objectives)
        tag = f" [{row['baseline']}]" if row["baseline"] else ""
        print(f"trial {trial.trial_id}{tag}: {row['status']}  {detail}", flush=True)
        print("  " + counts_line(self.tracker.summary(), self.num_samples), flush=True)

    def _show_front(self) -> None:
        self._shown_at = time.monotonic()
        front = self.tracker.front()
        ids = sorted(r["trial_id"] for r in front)
        if front and ids != self._shown_front:
            self._shown_front = ids
            print("current Pareto front:\n" + front_table(front, self.tracker.objectives), flush=True)
