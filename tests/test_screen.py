"""The search screen as a person sees it: ``tntsearch run`` on a tiny spec in a real
pseudo-terminal read through ``pyte`` (a VT100 emulator), and its plain lines through a pipe;
plus the status line's arithmetic against hand-computed values.

One real search per mode (module fixtures): 2 trials of 1 epoch in the terminal; in the pipe,
2 trials whose MACs limit makes them infeasible (costed, never trained).
"""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pyte
import pytest

from search_utils import demo_spec

from tntsearch.screen import format_duration, hypervolume_fraction, remaining_seconds

COLUMNS, LINES = 120, 60
# What Ray, Tune, Optuna and MLflow print on their own (loggers, Tune's box, the raylet).
LIBRARY_LINE = re.compile(
    r"INFO worker\.py|WARNING authentication_token|Started a local Ray instance|Creating initial MLflow database"
    r"|A new study created|Configuration for experiment|View detailed results|\(raylet\)|TensorBoard|INFO tune\.py"
)
TNTSEARCH = [sys.executable, "-c", "import sys; from tntsearch.cli import main; sys.exit(main())"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}


@pytest.fixture(scope="module")
def terminal_search(tmp_path_factory, digits):
    """``tntsearch run`` in a 120 x 60 pseudo-terminal; the final screen as pyte shows it."""
    cwd = tmp_path_factory.mktemp("screen")
    spec = demo_spec(cwd, digits, "screen-tty", num_samples=2, epochs=1, algorithm="random")
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    leader, follower = pty.openpty()
    os.set_blocking(leader, False)
    import fcntl, struct, termios  # noqa: E401 - the terminal's size, as a real one reports it

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    proc = subprocess.Popen([*TNTSEARCH, "run", str(spec)], cwd=cwd, env=_env(),
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    raw = bytearray()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            raw += chunk
            stream.feed(chunk)
        elif proc.poll() is not None:
            break
    rc = proc.wait(timeout=60)
    os.close(leader)
    lines = [line.rstrip() for line in screen.display]
    (cwd / "screen.txt").write_text("\n".join(lines))  # to read when a test fails
    return {"rc": rc, "lines": lines, "raw": bytes(raw), "cwd": cwd}


@pytest.fixture(scope="module")
def piped_search(tmp_path_factory, digits):
    """``tntsearch run`` with its output in a pipe; its 2 trials are the baselines, both over the MACs
    limit (the cheapest architecture of the space has 2.554M MACs, tiny_vit 2.573M)."""
    cwd = tmp_path_factory.mktemp("plain")
    spec = demo_spec(cwd, digits, "screen-plain", num_samples=2, epochs=1, algorithm="random",
                     constraints={"max_macs": 2.56e6})
    proc = subprocess.run([*TNTSEARCH, "run", str(spec), "--progress-interval", "1"], cwd=cwd, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    return {"rc": proc.returncode, "out": proc.stdout + proc.stderr, "cwd": cwd}


@pytest.mark.slow
def test_terminal_shows_status_block_and_front_within_100_columns(terminal_search):
    lines, text = terminal_search["lines"], "\n".join(terminal_search["lines"])
    assert terminal_search["rc"] == 0, text
    assert "[2/2 done] running 0 · completed 2 · stopped early 0 · infeasible 0 · failed 0" in text
    assert re.search(r"elapsed \d+(m\d\ds|s) · about 0s left · best val_top1 \d+\.\d\d · hypervolume 0\.\d{3} of the "
                     r"reference box", text), text
    head = next(i for i, line in enumerate(lines) if line.startswith("Pareto front ("))
    n = int(re.match(r"Pareto front \((\d)\)", lines[head]).group(1))
    table = lines[head + 1: head + 2 + n]  # header and one line per front trial
    assert table[0].split()[:4] == ["#", "trial", "top1↑", "macs↓"], table
    assert all(re.match(r"\s*\d+\s+[0-9a-f]{8}\s", row) for row in table[1:]), table
    assert max(len(row) for row in table) <= 100  # in a 120-column terminal: the table's own width
    assert "…" not in "\n".join(table)  # nothing cut short
    assert "ray_results/screen-tty/tntsearch.log" in text
    assert "dashboard: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false /" in text  # an absolute mlflow


@pytest.mark.slow
def test_terminal_hides_other_libraries_lines_in_the_log_file(terminal_search):
    shown = terminal_search["raw"].decode(errors="replace")
    assert not LIBRARY_LINE.search(shown), LIBRARY_LINE.search(shown)
    log = (terminal_search["cwd"] / "ray_results" / "screen-tty" / "tntsearch.log").read_text()
    assert "Started a local Ray instance" in log and "A new study created" in log


@pytest.mark.slow
def test_piped_output_is_plain_lines(piped_search):
    out = piped_search["out"]
    assert piped_search["rc"] == 0, out
    assert "\x1b" not in out  # no colours, no cursor movements
    trials = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(trials) == 2 and all(re.match(r"trial [0-9a-f]{8}( \[\w+\])?: infeasible  max_macs \+\d", t) for t in trials)
    assert "[2/2 done] running 0 · completed 0 · stopped early 0 · infeasible 2 · failed 0" in out
    assert "no feasible trial finished: the front is empty" in out
    assert not LIBRARY_LINE.search(out), LIBRARY_LINE.search(out)


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (0, 42.4, 60, 329, 3599.6, 7500)] == ["0s", "42s", "1m00s", "5m29s", "1h00m", "2h05m"]
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"


def test_remaining_time_counts_running_trials_by_their_epochs():
    # 100 s for 2 of 10 finished and one at epoch 5 of 15: 100 * (10 - 7/3) / (7/3)
    assert remaining_seconds(100.0, 10, 2, [5 / 15]) == pytest.approx(328.571, abs=1e-3)
    assert remaining_seconds(100.0, 10, 0, []) is None
    assert remaining_seconds(50.0, 4, 4, []) == 0.0


def test_hypervolume_is_a_fraction_of_the_reference_box():
    objectives = [("val_top1", "max", 0.0), ("macs", "min", 8.0e6)]
    assert hypervolume_fraction(5.08e8, objectives) == pytest.approx(0.635)  # 5.08e8 / (100 * 8e6)
    # throughput has no bound: its side of the box ends at the best throughput seen (400 - 100)
    rows = [{"metrics": {"throughput": 400.0}}, {"metrics": {"throughput": 250.0}}]
    assert hypervolume_fraction(7.5e3, [("val_top1", "max", 50.0), ("throughput", "max", 100.0)], rows) == pytest.approx(0.5)
    assert hypervolume_fraction(0.0, objectives) == 0.0
