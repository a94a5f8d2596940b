"""The live dashboard: one web page and one JSON endpoint, served by waitress (a small, pure-Python WSGI server).

`serve(snapshot, port)` serves `GET /` (the page: plain HTML, CSS and a little
JavaScript, no build step) and `GET /api/swarm` (what `snapshot()` returns, as
JSON; the page reads it every second). Nothing else: any other path is a 404, any
other method a 405. It binds to 127.0.0.1 unless told otherwise: a public
dashboard is a choice (`--dashboard-host 0.0.0.0`), and it shows only what the
run's DHT records already tell anyone who reads them.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class DashboardError(Exception):
    """The dashboard cannot start (its port taken, waitress missing)."""


def app_for(snapshot: Callable[[], dict]):
    """The WSGI application."""
    page = PAGE.encode()

    def app(environ, start_response):
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path not in ("/", "/api/swarm"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        if path == "/":
            body, kind = page, "text/html; charset=utf-8"
        else:
            body, kind = json.dumps(snapshot(), allow_nan=False, default=str).encode(), "application/json"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
        return [b""] if method == "HEAD" else [body]

    return app


class Dashboard:
    """A running dashboard server (`close` stops it)."""

    def __init__(self, server, thread: threading.Thread):
        self.server, self.thread = server, thread
        self.port = server.effective_port

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5.0)


def serve(snapshot: Callable[[], dict], port: int, host: str = "127.0.0.1") -> Dashboard:
    """Serve the dashboard at http://host:port/ from a thread; DashboardError if it cannot."""
    try:
        from waitress import create_server
    except ImportError:
        raise DashboardError("--dashboard needs the `waitress` package: pip install waitress") from None
    try:
        server = create_server(app_for(snapshot), host=host, port=port, threads=2, ident="p2p-diloco")
    except OSError as e:
        raise DashboardError(f"--dashboard {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    return Dashboard(server, thread)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>p2p-diloco run</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d232a; background: #fafbfc; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
 .facts span { display: inline-block; margin-right: 1.6em; } .facts b { font-size: 1.15em; }
 table { border-collapse: collapse; background: #fff; } th, td { padding: .25em .7em; border-bottom: 1px solid #e3e6ea; }
 th { text-align: left; font-weight: 600; background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 code { font-size: .95em; } .joining { color: #8a6d00; } .bad { color: #b00020; } .muted { color: #6b7480; }
 svg { background: #fff; border: 1px solid #e3e6ea; }
</style></head>
<body>
<h1>run <code id="run-id">…</code></h1>
<div class="facts">
 <span>swarm clock <b id="clock">–</b></span><span>peers <b id="peer-count">0</b></span>
 <span>throughput <b id="throughput">–</b></span><span>bytes sent <b id="bytes">–</b></span>
 <span>mean train loss <b id="loss">–</b></span><span>eval loss (agreed) <b id="eval-loss">–</b></span>
</div>
<div id="model" class="muted"></div><div id="status" class="muted"></div>
<h2>Peers</h2>
<table id="peers"><thead><tr><th>peer</th><th>state</th><th>device</th><th>inner steps</th><th>global step</th>
<th>rounds per fragment</th><th>failed</th><th>tokens/s</th><th>uplink</th><th>sent</th><th>loss</th><th>last seen</th>
</tr></thead><tbody></tbody></table>
<h2>Fragment schedule</h2>
<table id="schedule"><thead><tr><th>fragment</th><th>rounds done</th><th>next round at global step</th></tr></thead>
<tbody></tbody></table>
<h2>Over time</h2>
<svg id="chart" width="640" height="160" role="img" aria-label="tokens per second over time"></svg>
<div class="muted">tokens/s of the whole swarm (line) and live peers (dots), one point every 5 s</div>
<svg id="eval-chart" width="640" height="160" role="img" aria-label="eval loss of the agreed parameters"></svg>
<div class="muted" id="eval-note">eval loss of the agreed parameters (every fragment's agreed state, downloaded and
checked against its hash) against the global step</div>
<script>
"use strict";
const fmtBytes = b => b >= 1e9 ? (b / 1e9).toFixed(2) + " GB" : b >= 1e6 ? (b / 1e6).toFixed(2) + " MB"
  : (b / 1e3).toFixed(1) + " kB";
const cell = (row, text, cls) => { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; };
function draw(history) {
  const svg = document.getElementById("chart"); svg.replaceChildren();
  if (history.length < 2) return;
  const w = 640, h = 160, t0 = history[0].time, t1 = history[history.length - 1].time;
  const top = Math.max(...history.map(p => p.tokens_per_s), 1), most = Math.max(...history.map(p => p.peers), 1);
  const x = t => 5 + (w - 10) * (t - t0) / Math.max(t1 - t0, 1e-9);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", history.map(p => x(p.time) + "," + (h - 5 - (h - 10) * p.tokens_per_s / top)).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2962ff"); line.setAttribute("stroke-width", "2");
  svg.appendChild(line);
  for (const p of history) {
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", x(p.time)); dot.setAttribute("cy", h - 5 - (h - 10) * p.peers / most);
    dot.setAttribute("r", 2); dot.setAttribute("fill", "#8a6d00"); svg.appendChild(dot);
  }
}
function drawEval(evals) {
  const svg = document.getElementById("eval-chart"); svg.replaceChildren();
  const pts = evals.filter(p => p.clock !== null);
  if (!pts.length) return;
  const w = 640, h = 160, c0 = Math.min(...pts.map(p => p.clock)), c1 = Math.max(...pts.map(p => p.clock));
  const lo = Math.min(...pts.map(p => p.eval_loss)), hi = Math.max(...pts.map(p => p.eval_loss));
  const x = c => 30 + (w - 40) * (c - c0) / Math.max(c1 - c0, 1e-9);
  const y = v => 10 + (h - 25) * (hi - v) / Math.max(hi - lo, 1e-9);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.map(p => x(p.clock) + "," + y(p.eval_loss)).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#00897b"); line.setAttribute("stroke-width", "2");
  svg.appendChild(line);
  for (const p of pts) {
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", x(p.clock)); dot.setAttribute("cy", y(p.eval_loss)); dot.setAttribute("r", 3);
    dot.setAttribute("fill", "#00897b"); svg.appendChild(dot);
  }
  for (const [v, at] of [[hi, 14], [lo, h - 12]]) {
    const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
    t.setAttribute("x", 2); t.setAttribute("y", at); t.setAttribute("font-size", "10"); t.textContent = v.toFixed(2);
    svg.appendChild(t);
  }
}
async function refresh() {
  let s;
  try { s = await (await fetch("/api/swarm", {cache: "no-store"})).json(); }
  catch (e) { document.getElementById("status").textContent = "cannot reach this dashboard's server: " + e; return; }
  document.getElementById("run-id").textContent = s.run_id;
  const total = s.run ? s.run.total_steps : null;
  document.getElementById("clock").textContent = s.clock === null ? "–" : Math.floor(s.clock) + (total ? " / " + total : "");
  document.getElementById("peer-count").textContent = s.peers.length;
  document.getElementById("throughput").textContent = Math.round(s.tokens_per_s) + " tok/s";
  document.getElementById("bytes").textContent = fmtBytes(s.bytes_sent);
  document.getElementById("loss").textContent = s.mean_loss === null ? "–" : s.mean_loss.toFixed(4);
  document.getElementById("model").textContent = s.run ? "model " + JSON.stringify(s.run.model) + ", H=" +
    s.run.outer_period + ", " + s.run.fragments + " fragments, codec " + s.run.codec +
    (s.run.admission_only ? ", admission-only" : ", admits anyone") : "run config not read yet";
  document.getElementById("status").textContent = s.error ? "last read failed: " + s.error
    : s.read_s_ago === null ? "reading the DHT…" : "read from the DHT " + s.read_s_ago + " s ago";
  const body = document.querySelector("#peers tbody"); body.replaceChildren();
  for (const p of s.peers) {
    const row = body.insertRow(); row.dataset.peer = p.peer_id;
    cell(row, p.peer_id.slice(0, 12) + "…"); row.cells[0].title = p.peer_id;
    cell(row, p.state + (p.reachable ? "" : " (client mode)"), p.state === "joining" ? "joining" : "");
    cell(row, p.device || "?"); cell(row, p.step, "num"); cell(row, Math.floor(p.global_step), "num");
    cell(row, p.rounds.join("/")); cell(row, p.rounds_failed, p.rounds_failed ? "num bad" : "num");
    cell(row, Math.round(p.tokens_per_s), "num");
    cell(row, p.uplink_mbit ? p.uplink_mbit.toFixed(1) + " Mbit/s" : "–", "num");
    cell(row, fmtBytes(p.bytes_sent), "num"); cell(row, p.loss === null ? "–" : p.loss.toFixed(4), "num");
    cell(row, p.last_seen_s + " s ago", "num");
  }
  const sched = document.querySelector("#schedule tbody"); sched.replaceChildren();
  for (const f of s.schedule) {
    const row = sched.insertRow(); cell(row, f.fragment, "num"); cell(row, f.rounds, "num"); cell(row, f.next_round_at, "num");
  }
  draw(s.history);
  const evals = s.evals || [], last = evals.length ? evals[evals.length - 1] : null;
  document.getElementById("eval-loss").textContent = last ? last.eval_loss.toFixed(4) : "–";
  document.getElementById("eval-loss").title = last ? "rounds " + last.rounds.join("/") + ", global step " +
    (last.clock === null ? "?" : Math.floor(last.clock)) : (s.eval_problem || "");
  document.getElementById("eval-note").textContent = !last && s.eval_problem ? "eval of the agreed parameters: " +
    s.eval_problem : "eval loss of the agreed parameters (every fragment's agreed state, downloaded and checked " +
    "against its hash) against the global step";
  drawEval(evals);
}
refresh(); setInterval(refresh, 1000);
</script>
</body></html>
"""
