"""The search screen: what a person watching ``tntsearch run`` sees (docs/design.md, "What a user sees").

A Ray Tune callback in the driver that reads the ``MlflowTracker``'s view of the trials (the
one place outcomes are decided), so the screen and MLflow never disagree. On a terminal it is
a live ``rich`` view: a status block (counts by outcome, elapsed and remaining time, best
accuracy, hypervolume as a fraction of the reference box), the front as a table that fits 100
columns, and one line per failed trial. Elsewhere (CI, ``ray job submit`` logs) it prints
plain lines: one per finished trial with the counts, and a status line every ``interval`` s.

Other libraries' output (Ray, Tune, Optuna and MLflow loggers; Tune's boxes, the workers' and
the raylet's lines, which Ray prints to ``sys.stdout``) goes to ``tntsearch.log`` beside the
search's results, unless ``verbose``. Our own loggers (``tntsearch.*``) stay on the screen.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from tntsearch import pareto

__all__ = [
    "SearchScreen",
    "format_duration",
    "hypervolume_fraction",
    "remaining_seconds",
    "counts_line",
    "front_table",
    "dashboard_command",
    "report_command",
    "log_path",
]

_FINISHED = ("completed", "stopped_early", "infeasible", "failed")
# Where each objective's box ends on the good side: accuracies are percentages, the costs and
# the loss cannot go below 0. A maximised metric without a bound (throughput) uses the best
# value seen.
_IDEAL = {"val_top1": 100.0, "val_top5": 100.0, "val_loss": 0.0, "macs": 0.0, "params": 0.0}
# Short column names (the paper's symbols where it has them) for the front table.
_ARCH_SHORT = {
    "img_size": "img", "patch_size": "p", "outer_dim": "d", "depth": "L", "outer_heads": "h", "mlp_ratio": "r",
    "inner_dim": "c", "words": "m", "inner_heads": "h_in", "inner_mlp_ratio": "r_in", "se": "se",
    "se_ratio": "se_r", "tnt_blocks": "tnt", "drop_path": "dp", "num_classes": "cls",
}
_METRIC_SHORT = {"val_top1": "top1", "val_top5": "top5", "val_loss": "loss", "throughput": "img/s"}


def _value(row: Mapping[str, Any], metric: str) -> float:
    v = (row.get("metrics") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def format_duration(seconds: float | None) -> str:
    """``42s``, ``5m29s``, ``2h05m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def hypervolume_fraction(hypervolume: float, objectives: Any, rows: Sequence[Mapping[str, Any]] = ()) -> float:
    """The hypervolume over the volume of the reference box, in [0, 1].

    The box spans each objective from its reference value (the spec's ``ref``) to its best
    possible value: 100 for accuracies, 0 for costs and the loss, and for a maximised metric
    with no bound the best value among ``rows``. So for accuracy (ref 0) against MACs (ref 8e6)
    a hypervolume of 5.08e8 is 5.08e8 / (100 * 8e6) = 0.635."""
    volume = 1.0
    for o in pareto.as_objectives(objectives):
        ideal = _IDEAL.get(o.metric)
        if ideal is None:
            seen = [_value(r, o.metric) for r in rows]
            seen = [v for v in seen if math.isfinite(v)]
            ideal = (max(seen) if o.mode == "max" else min(seen)) if seen else o.ref
        volume *= max(ideal - o.ref, 0.0) if o.mode == "max" else max(o.ref - ideal, 0.0)
    if volume <= 0 or not math.isfinite(hypervolume):
        return 0.0
    return min(max(hypervolume / volume, 0.0), 1.0)


def remaining_seconds(elapsed: float, num_samples: int, finished: int, running_progress: Sequence[float]) -> float | None:
    """Time left if the rest goes at the pace so far: each finished trial counts 1, a running
    one the fraction of its epochs done. E.g. 100 s for 2 of 10 finished and one running at
    epoch 5 of 15: done = 2 + 1/3, left = 100 * (10 - 7/3) / (7/3) = 328.6 s."""
    done = finished + sum(min(max(p, 0.0), 1.0) for p in running_progress)
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed * max(num_samples - done, 0.0) / done


def counts_line(summary: Mapping[str, Any], num_samples: int) -> str:
    """``[4/10 done] running 2 · completed 3 · stopped early 0 · infeasible 1 · failed 0``."""
    done = sum(summary.get(s, 0) for s in _FINISHED)
    parts = [f"{s.replace('_', ' ')} {summary.get(s, 0)}" for s in _FINISHED]
    return f"[{done}/{num_samples} done] running {summary.get('running', 0)} · " + " · ".join(parts)


def _number(v: Any) -> str:
    """Short numbers: ``2.57M``, ``14.7k``, ``91.67``, ``8662``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(f) >= scale:
            return f"{f / scale:.3g}{suffix}"
    return f"{f:.4g}"


def _arch_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    return _number(v) if isinstance(v, float) else str(v)


def front_table(front: Sequence[Mapping[str, Any]], objectives: Any, *, verbose: bool = False) -> Table:
    """The front, best first on the first objective: 8-character trial ids, the objectives and
    costs, and only the architecture parameters that differ between the rows (short names:
    d, L, c, m, h_in, se, tnt ...). ``verbose`` adds the full trial id and MLflow run id."""
    objs = pareto.as_objectives(objectives)
    first = objs[0]
    rows = sorted(front, key=lambda r: -_value(r, first.metric) if first.mode == "max"
                  else _value(r, first.metric))
    metrics = list(dict.fromkeys([*(o.metric for o in objs), "macs", "params", "throughput"]))
    modes = {o.metric: o.mode for o in objs}
    keys = [k for k in _ARCH_SHORT if len({_arch_value((r.get("arch") or {}).get(k, "-")) for r in rows}) > 1]
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("trial", no_wrap=True)
    for m in metrics:
        arrow = {"max": "↑", "min": "↓"}.get(modes.get(m, ""), "")
        table.add_column(_METRIC_SHORT.get(m, m) + arrow, justify="right", no_wrap=True)
    for k in keys:
        table.add_column(_ARCH_SHORT[k], no_wrap=True)
    table.add_column("baseline", no_wrap=True)
    if verbose:
        table.add_column("trial id / MLflow run", no_wrap=True)
    for i, r in enumerate(rows, 1):
        cells = [str(i), str(r.get("trial_id") or "")[:8]]
        cells += [_number(_value(r, m)) for m in metrics]
        cells += [_arch_value((r.get("arch") or {}).get(k, "-")) for k in keys]
        cells.append(str(r.get("baseline") or ""))
        if verbose:
            cells.append(f"{r.get('trial_id')} {r.get('run_id') or '-'}")
        table.add_row(*cells)
    return table


def dashboard_command(tracking_uri: str) -> str:
    """A command that opens the MLflow UI on this search's store, to paste as is: this
    environment's ``mlflow``, absolute paths (docs/tracking.md, "Opening the dashboard")."""
    if not tracking_uri.startswith("sqlite:"):
        return f"open {tracking_uri}"
    mlflow = Path(sys.executable).with_name("mlflow")
    exe = str(mlflow) if mlflow.exists() else "mlflow"
    return ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false " + shlex.join(
        [exe, "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", "5000"]))


def report_command(tracking_uri: str, parent_run_id: str | None) -> str:
    """``tntsearch report`` for this search, to paste as is (this environment's command)."""
    exe = Path(sys.executable).with_name("tntsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tntsearch.report"]
    return shlex.join([*cmd, *(["report"] if exe.exists() else []), "--run-id", str(parent_run_id),
                       "--tracking-uri", tracking_uri])


def log_path(spec: Any) -> Path:
    """``<storage>/<name>/tntsearch.log``: beside Tune's results; in the working directory
    when the storage is remote (``s3://``)."""
    if "://" in spec.storage:
        return Path(f"tntsearch-{spec.name}.log").resolve()
    return Path(spec.storage, spec.name, "tntsearch.log").resolve()


def _short_path(path: str | os.PathLike[str]) -> str:
    """Relative to the working directory when below it: shorter lines."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd()))
    return str(path)


class _Routing:
    """Moves other libraries' console output into a log file, and back on ``close``."""

    def __init__(self, log_path: Path, verbose: bool, console: Console):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        self.verbose = verbose
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        if console.is_terminal:
            self.ours: logging.Handler = RichHandler(console=console, show_time=False, show_path=False)
        else:
            self.ours = logging.StreamHandler(sys.stderr)
            self.ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.removed: list[tuple[logging.Logger, logging.Handler]] = []
        self.streams = (sys.stdout, sys.stderr)
        logging.getLogger("tntsearch").addHandler(self.ours)
        logging.captureWarnings(True)
        if not verbose:
            sys.stdout = sys.stderr = self.file
        self.apply()

    def apply(self) -> None:
        """(Again:) every logger but ours that writes to the terminal writes to the file
        instead. Libraries add their handlers on import and Ray again in ``ray.init``."""
        loggers = [logging.getLogger(), *(lg for name, lg in logging.root.manager.loggerDict.items()
                                          if isinstance(lg, logging.Logger) and not name.startswith("tntsearch"))]
        for lg in loggers:
            console = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler) and h is not self.handler]
            for h in console:
                if not self.verbose:
                    lg.removeHandler(h)
                    self.removed.append((lg, h))
            if (console or lg is logging.root) and self.handler not in lg.handlers:
                lg.addHandler(self.handler)

    def close(self) -> None:
        sys.stdout, sys.stderr = self.streams
        logging.captureWarnings(False)
        logging.getLogger("tntsearch").removeHandler(self.ours)
        for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
            if isinstance(lg, logging.Logger) and self.handler in lg.handlers:
                lg.removeHandler(self.handler)
        for lg, h in self.removed:
            lg.addHandler(h)
        self.file.close()


class SearchScreen(Callback):
    """The live view (terminal) or plain lines (otherwise) of one search; see the module docstring.

    Tune pickles callbacks with the experiment, so a resumed search gets this object back:
    what holds the terminal lives only between :meth:`showing`'s enter and exit.
    Must come after the tracker in ``callbacks`` so that it sees each outcome recorded.
    """

    def __init__(self, num_samples: int, epochs: int, interval: float = 30.0, tracker: Any = None):
        self.tracker = tracker  # the search's MlflowTracker, set before the search starts
        self.num_samples = num_samples
        self.epochs = epochs
        self.interval = interval
        self.failures: dict[str, str] = {}  # trial id -> where its full log is
        self._progress: dict[str, float] = {}  # running trial id -> fraction of its epochs done
        self._clear_transient()

    def _clear_transient(self) -> None:
        self._console: Console | None = None
        self._live: Live | None = None
        self._routing: _Routing | None = None
        self._log_path: Path | None = None
        self._verbose = False
        self._started = time.monotonic()
        self._last_line = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_console", "_live", "_routing"):
            state[k] = None
        return state

    @contextlib.contextmanager
    def showing(self, log_path: str | os.PathLike[str], *, verbose: bool = False,
                out: TextIO | None = None) -> Iterator[SearchScreen]:
        """Route other libraries' output to ``log_path`` (unless ``verbose``) and show the
        screen on ``out`` (default: this process's stdout) until the block ends."""
        out = out or sys.stdout
        console = Console(file=out, width=None if out.isatty() else 100, highlight=False)
        self._console, self._log_path, self._verbose = console, Path(log_path), verbose
        self._started, self._last_line = time.monotonic(), time.monotonic()
        self._routing = _Routing(self._log_path, verbose, console)
        try:
            if console.is_terminal:
                # NOTE: refreshed from Tune's loop (on_step_end), not rich's thread: the
                # tracker's tables change in this thread only.
                self._live = Live(self._view(), console=console, auto_refresh=False,
                                  redirect_stdout=verbose, redirect_stderr=verbose)
                self._live.start()
            else:
                self._line(f"other libraries' messages: {_short_path(self._log_path)}"
                           + (" (also shown here: --verbose)" if verbose else " (shown here with --verbose)"))
            yield self
        finally:
            if self._live is not None:
                self._live.stop()
            self._routing.close()
            self._clear_transient()

    @property
    def live(self) -> bool:
        """Whether this is the live terminal view (else plain lines)."""
        return self._console is not None and self._console.is_terminal

    @property
    def verbose(self) -> bool:
        return self._verbose

    def stop_live(self) -> None:
        """End the live view, leaving its last state on the screen; later prints go below."""
        if self._live is not None:
            self._refresh()
            self._live.stop()
            self._live = None

    def reroute(self) -> None:
        """Catch loggers configured since :meth:`showing` began (``ray.init`` adds its own)."""
        if self._routing is not None:
            self._routing.apply()

    def print(self, *renderables: Any) -> None:
        """Print below the live view (or as plain lines). Strings are printed as they are:
        rich would take ``[tiny_vit]`` for markup and drop it."""
        if self._console is not None:
            self._console.print(*(Text(r) if isinstance(r, str) else r for r in renderables))
        else:
            print(*renderables, flush=True)

    # -- Tune hooks ------------------------------------------------------------------------

    def setup(self, *args: Any, **info: Any) -> None:
        self.reroute()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = result.get("epoch") or 0
        if result.get("feasible", 1):
            self._progress[trial.trial_id] = float(epoch) / max(self.epochs, 1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failures[trial.trial_id] = _short_path(Path(trial.path or trial.local_path or ".", "error.txt"))
        self._finished(trial)

    def on_step_end(self, iteration, trials, **info):
        if self._live is not None:
            if time.monotonic() - self._last_line >= 1.0:
                self._refresh()
        elif time.monotonic() - self._last_line > self.interval:
            self._line("  " + "  ".join(self.status_lines()))

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._refresh()

    # -- what is shown ---------------------------------------------------------------------

    def status_lines(self) -> list[str]:
        """The status block: counts; time; best accuracy and hypervolume."""
        if self.tracker is None:
            return [counts_line({}, self.num_samples), f"elapsed {format_duration(time.monotonic() - self._started)}"]
        s = self.tracker.summary()
        elapsed = time.monotonic() - self._started
        finished = sum(s.get(k, 0) for k in _FINISHED)
        left = remaining_seconds(elapsed, self.num_samples, finished, list(self._progress.values()))
        when = f"elapsed {format_duration(elapsed)} · about {format_duration(left)} left"
        rows = self.tracker.rows()
        best = [r["metrics"]["val_top1"] for r in rows if r["status"] in ("completed", "stopped_early")
                and math.isfinite(r["metrics"].get("val_top1", math.nan))]
        quality = f"best val_top1 {max(best):.2f}" if best else "best val_top1 -"
        hv = hypervolume_fraction(s.get("hypervolume", 0.0), self.tracker.objectives, rows)
        quality += f" · hypervolume {hv:.3f} of the reference box"
        return [counts_line(s, self.num_samples), when + " · " + quality]

    def failure_lines(self) -> list[str]:
        """One line per failed trial: its reason and where its full log is."""
        out = []
        for r in self.tracker.rows() if self.tracker is not None else []:
            if r["status"] == "failed":
                where = self.failures.get(r["trial_id"], "MLflow error.txt")
                out.append(f"failed {r['trial_id'][:8]}: {str(r['reason'] or '?').splitlines()[0][:80]} (log: {where})")
        return out

    def _view(self) -> Group:
        name = self.tracker.run_name if self.tracker is not None else "starting"
        head = Text.assemble(("tntsearch ", "bold"), f"{name} · Ray, Optuna, MLflow messages: "
                             + (_short_path(self._log_path) if self._log_path else "-"))
        status = Text("\n".join(self.status_lines()))
        front = self.tracker.front() if self.tracker is not None else []
        parts: list[Any] = [head, status]
        if front:
            parts += [Text(f"Pareto front ({len(front)})", style="bold"),
                      front_table(front, self.tracker.objectives, verbose=self._verbose)]
        parts += [Text(line, style="red") for line in self.failure_lines()]
        return Group(*parts)

    def _refresh(self) -> None:
        self._last_line = time.monotonic()
        self._live.update(self._view(), refresh=True)

    def _line(self, line: str) -> None:
        self._last_line = time.monotonic()
        self.print(line)

    def _finished(self, trial: Any) -> None:
        self._progress.pop(trial.trial_id, None)
        if self._live is not None:
            self._refresh()
            return
        row = next((r for r in self.tracker.rows() if r["trial_id"] == trial.trial_id), None)
        if row is None:
            return
        if row["status"] == "failed":
            detail = f"{str(row['reason'] or '?').splitlines()[0][:120]} (log: {self.failures.get(trial.trial_id, 'MLflow')})"
        elif row["status"] == "infeasible":
            detail = row["reason"] or ""
        else:
            detail = "  ".join(f"{o.metric}={_number(_value(row, o.metric))}" for o in self.tracker.objectives)
        tag = f" [{row['baseline']}]" if row["baseline"] else ""
        self._line(f"trial {trial.trial_id}{tag}: {row['status']}  {detail}")
        self._line("  " + "  ".join(self.status_lines()))
