"""One self-contained HTML page about a search, to open in any browser, offline: the front's
pictures for every objective pair, the hypervolume over time, the baselines' places and every
trial in a table that filters by status, front membership and text (docs/design.md, "What a
user sees"). ``tntsearch report`` writes it from what MLflow holds.

The front's pictures are ``plots.write_front_html``'s page (plotly.js embedded once), taken in
whole; the hypervolume plot and the table follow it on the same page.
"""
from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from tntsearch import plots
from tntsearch.screen import hypervolume_fraction

__all__ = ["write_report"]

_ARCH = ("outer_dim", "depth", "inner_dim", "words", "inner_heads", "se", "tnt_blocks")
# Applies the filters; the page's address can set them: report.html#status=completed&front=1&text=tiny
_SCRIPT = """
function applyFilters() {
  const status = document.getElementById('status').value, front = document.getElementById('front').checked;
  const text = document.getElementById('text').value.toLowerCase();
  let shown = 0;
  for (const tr of document.querySelectorAll('#trials tbody tr')) {
    const ok = (!status || tr.dataset.status === status) && (!front || tr.dataset.front === '1')
      && (!text || tr.textContent.toLowerCase().includes(text));
    tr.style.display = ok ? '' : 'none';
    shown += ok;
  }
  document.getElementById('shown').textContent = shown;
}
const given = new URLSearchParams(location.hash.slice(1));
document.getElementById('status').value = given.get('status') || '';
document.getElementById('front').checked = given.get('front') === '1';
document.getElementById('text').value = given.get('text') || '';
for (const id of ['status', 'front', 'text']) document.getElementById(id).addEventListener('input', applyFilters);
applyFilters();
"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    return html.escape(str(v))


def _hypervolume_div(history: Sequence[Any], objectives: Any, rows: Sequence[Any]) -> str:
    """Hypervolume (fraction of the reference box) after each finished trial, against time."""
    import plotly.graph_objects as go

    if not history:
        return "<p>No hypervolume history in MLflow for this search.</p>"
    pts = sorted(history, key=lambda m: (m.timestamp, m.step))
    when = [datetime.fromtimestamp(m.timestamp / 1000, tz=timezone.utc) for m in pts]
    frac = [hypervolume_fraction(m.value, objectives, rows) for m in pts]
    fig = go.Figure(go.Scatter(x=when, y=frac, mode="lines+markers", line_shape="hv",
                               hovertext=[f"after {m.step} finished trials: {m.value:.4g}" for m in pts]))
    fig.update_layout(title="hypervolume over time", yaxis_title="fraction of the reference box",
                      yaxis_range=[0, 1], template="plotly_white", height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _table(search: Any) -> str:
    front_ids = search.front_ids
    metrics = list(dict.fromkeys([*(o.metric for o in search.objectives), "val_top1", "macs", "params", "throughput"]))
    head = ["trial", "status", "front", "baseline", *metrics, *_ARCH, "reason", "MLflow run"]
    body = []
    for r in search.rows:
        on = r["trial_id"] in front_ids
        cells = [html.escape(str(r["trial_id"])), r["status"], "yes" if on else "", r["baseline"] or ""]
        cells += [_cell(float(r["metrics"][m])) if m in r["metrics"] else "-" for m in metrics]
        cells += [_cell((r.get("arch") or {}).get(k, "-")) for k in _ARCH]
        cells += [html.escape(str(r.get("reason") or "")), html.escape(str(r.get("run_id") or ""))]
        body.append(f"<tr data-status='{html.escape(r['status'])}' data-front='{int(on)}'>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    statuses = sorted({r["status"] for r in search.rows})
    options = "<option value=''>any</option>" + "".join(f"<option>{html.escape(s)}</option>" for s in statuses)
    return (
        "<h2>Trials</h2><p>status <select id='status'>" + options + "</select> "
        "<label><input type='checkbox' id='front'> on the front only</label> "
        "text <input id='text' size='20'> · <span id='shown'></span> of " + str(len(search.rows)) + " shown</p>"
        "<table id='trials'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
        + "".join(body) + "</tbody></table>"
    )


def _baselines(search: Any) -> str:
    front_ids = search.front_ids
    items = []
    for b in (r for r in search.rows if r["baseline"]):
        where = "on the front" if b["trial_id"] in front_ids else "dominated by the front"
        if b["status"] in ("infeasible", "failed", "running"):
            where = b["status"]
        items.append(f"<li><b>{html.escape(b['baseline'])}</b> ({html.escape(str(b['trial_id']))}): {where}</li>")
    return "<h2>Baselines</h2><ul>" + "".join(items) + "</ul>" if items else ""


def write_report(search: Any, path: str | Path, hypervolume_history: Sequence[Any] = ()) -> Path:
    """Write ``search`` (a ``tntsearch.report.SearchResult``) as one HTML page at ``path``;
    ``hypervolume_history`` is the parent run's ``hypervolume`` metric (MLflow ``Metric``s)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front_page = plots.write_front_html(search.candidates, search.objectives, path.with_name("front.html"),
                                        title=search.name, hypervolume_value=search.hypervolume,
                                        front=search.front_ids).read_text()
    front = front_page.split("<body", 1)[1].split(">", 1)[1].rsplit("</body>", 1)[0]
    counts: dict[str, int] = {}
    for r in search.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    frac = hypervolume_fraction(search.hypervolume, search.objectives, search.candidates)
    objectives = ", ".join(f"{o.metric} ({o.mode}, ref {o.ref:g})" for o in search.objectives)
    title = html.escape(f"tntsearch report: {search.name}")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1em 2em} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#eee}</style></head><body>"
        f"<h1>{title}</h1><p>parent run {html.escape(search.parent_run_id)} · {len(search.rows)} trials "
        f"{html.escape(json.dumps(counts))} · objectives {html.escape(objectives)} · hypervolume "
        f"{search.hypervolume:.4g} ({frac:.3f} of the reference box)</p>"
        f"<section id='front-pictures'>{front}</section>"
        f"<section id='hypervolume'>{_hypervolume_div(hypervolume_history, search.objectives, search.candidates)}</section>"
        f"<section id='baselines'>{_baselines(search)}</section>"
        f"<section>{_table(search)}</section><script>{_SCRIPT}</script></body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
