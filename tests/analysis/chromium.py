"""Load a page in a real headless Chromium over the DevTools protocol and report what happened:
console errors, uncaught exceptions, network requests, plot containers, a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--remote-debugging-port=0"]

# Each plot container: is it drawn (an SVG with at least one trace), how many traces it has, and
# where its parts landed: the figure (the outer svg.main-svg), the plot area (the drag rectangle
# plotly lays over the axes, .nsewdrag), the legend (its entries and title) and the x-axis title, as page rectangles.
PLOTS_JS = """(() => {
  const rect = e => { if (!e) return null; const r = e.getBoundingClientRect();
                      return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height}; };
  // the legend as a reader sees it: its entries' symbols and texts and its title (the clickable boxes and the background may be wider)
  const union = es => { const rs = es.map(rect).filter(r => r && r.width > 0); if (!rs.length) return null;
                        const l = Math.min(...rs.map(r => r.left)), t = Math.min(...rs.map(r => r.top)),
                              r = Math.max(...rs.map(r => r.right)), b = Math.max(...rs.map(r => r.bottom));
                        return {left: l, top: t, right: r, bottom: b, width: r - l, height: b - t}; };
  return JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => ({
    id: d.id, traces: (d._fullData || []).length, svg: d.querySelectorAll('svg.main-svg').length,
    marks: d.querySelectorAll('.scatterlayer .trace, .barlayer .trace, .heatmaplayer .hm, g.bars path').length,
    points: (d._fullData || []).reduce((n, t) => n + ((t.z || t.x || []).length || 0), 0),
    height: d.getBoundingClientRect().height,
    figure: rect(d.querySelector('svg.main-svg')), plot_area: rect(d.querySelector('.draglayer .nsewdrag')),
    legend: union(Array.from(d.querySelectorAll('g.legend g.traces text.legendtext, g.legend g.traces g.layers, g.legend .legendtitletext'))), xtitle: rect(d.querySelector('.g-xtitle text')),
    legend_items: d.querySelectorAll('g.legend g.traces').length,
    legend_texts: Array.from(d.querySelectorAll('g.legend g.traces text.legendtext')).map(t => t.textContent)})));
})()"""


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    title: str = ""


class _Session:
    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if any(e.get("method") == method for e in self.events):
            return
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(f"no {method} within {timeout_s} s")


def load_page(path: Path, screenshot: Path | None = None, width: int = 1400, height: int = 2200,
              settle_s: float = 2.0, timeout_s: float = 60.0, clip: tuple[int, int, int, int] | None = None) -> PageReport:
    """Open ``path`` (a local HTML file) in a ``width`` × ``height`` headless Chromium window and
    report console errors, uncaught exceptions, every request the page made and its plot
    containers; optionally save a screenshot of the window (or of the page rectangle ``clip``:
    x, y, width, height in CSS pixels)."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("no chromium binary (bash scripts/chromium.sh installs it)")
    profile = tempfile.mkdtemp(prefix="epkit-chromium-")
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        s = _Session(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            s.call(f"{domain}.enable")
        s.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        s.call("Page.navigate", url=path.resolve().as_uri())
        s.wait_event("Page.loadEventFired", timeout_s)
        time.sleep(settle_s)  # plotly draws after load; give late errors a chance to show
        report = PageReport()
        report.plots = json.loads(s.call("Runtime.evaluate", expression=PLOTS_JS, returnByValue=True)["result"]["value"])
        report.title = s.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        if screenshot is not None:
            extra = {} if clip is None else {"clip": dict(zip(("x", "y", "width", "height"), clip), scale=1),
                                             "captureBeyondViewport": True}
            shot = s.call("Page.captureScreenshot", format="png", **extra)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        s.call("Runtime.evaluate", expression="1")  # flush pending events
        for e in s.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                report.console_errors.append(p["entry"].get("text", ""))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                report.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif m == "Network.requestWillBeSent":
                report.requests.append(p["request"]["url"])
        s.ws.close()
        return report
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
