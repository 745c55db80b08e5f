"""Render an HTML page in headless Chromium and report what a user would see (for the tests).

Chromium comes from the distribution's packages (``apt-get install chromium``; ``make test``
installs it when missing).  The page is driven through the DevTools protocol over a websocket
(``websocket-client``): console errors, exceptions and every network request are collected, a
full-page screenshot is taken, and each ``<svg>`` is measured (size, drawn elements, and the
pixel spread of its area in the screenshot, so a blank plot is caught).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Flags of a quiet, isolated headless browser (no sandbox: CI runs as root).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1200,900")


def find_chromium() -> str | None:
    """Path of the Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What rendering one page showed."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    svgs: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    screenshot: bytes = b""


class _Cdp:
    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not any(ev.get("method") == method for ev in self.events):
            if time.monotonic() > end:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _start(binary: str, profile: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: helpers end with it


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End Chromium and every helper process it started (they write to the profile until they exit)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            continue
        time.sleep(0.2)  # let the group's other members go too


def _page_ws(profile: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    import urllib.request

    port_file = Path(profile) / "DevToolsActivePort"
    end = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError("chromium did not start (no DevToolsActivePort)")
        time.sleep(0.05)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        targets = json.load(r)
    return next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")


_MEASURE = """JSON.stringify(Array.from(document.querySelectorAll('svg')).filter(s => !s.parentElement.closest('svg'))
  .map(s => { const r = s.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height,
            drawn: s.querySelectorAll('path,line,polyline,circle,rect,use,text').length}; }))"""


def render(path: str | os.PathLike[str], screenshot_path: str | os.PathLike[str] | None = None,
           binary: str | None = None) -> PageResult:
    """Load ``path`` in headless Chromium; collect errors and requests, measure SVGs, screenshot."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium not found")
    url = Path(path).resolve().as_uri()
    # a helper process still flushing its profile must not fail the page
    with tempfile.TemporaryDirectory(prefix="lineage-chromium-", ignore_cleanup_errors=True) as profile:
        proc = _start(binary, profile)
        try:
            cdp = _Cdp(_page_ws(profile, proc))
            for domain in ("Page", "Runtime", "Network", "Log"):
                cdp.call(f"{domain}.enable")
            cdp.call("Page.navigate", url=url)
            cdp.wait_for("Page.loadEventFired")
            time.sleep(0.2)
            res = PageResult(url)
            res.title = cdp.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
            res.svgs = json.loads(cdp.call("Runtime.evaluate", expression=_MEASURE, returnByValue=True)["result"]["value"])
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            res.screenshot = base64.b64decode(shot["data"])
            _collect(cdp.events, res)
            cdp.close()
        finally:
            _stop(proc)
    if screenshot_path is not None:
        Path(screenshot_path).write_bytes(res.screenshot)
    _pixel_spread(res)
    return res


def _collect(events: list[dict[str, Any]], res: PageResult) -> None:
    for ev in events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            res.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            res.console_errors.append(str(p.get("exceptionDetails", {}).get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            res.console_errors.append(str(p["entry"].get("text")))
        elif m == "Network.requestWillBeSent":
            u = str(p.get("request", {}).get("url", ""))
            if not u.startswith(("file:", "data:", "about:")):
                res.external_requests.append(u)


def _pixel_spread(res: PageResult) -> None:
    """Standard deviation of the screenshot's pixels inside each SVG's box (0 = blank)."""
    import io

    from matplotlib.image import imread

    img = imread(io.BytesIO(res.screenshot), format="png")
    h, w = img.shape[:2]
    for s in res.svgs:
        x0, y0 = max(0, int(s["x"])), max(0, int(s["y"]))
        x1, y1 = min(w, int(s["x"] + s["w"])), min(h, int(s["y"] + s["h"]))
        box = img[y0:y1, x0:x1, :3]
        s["pixel_std"] = float(box.std()) if box.size else 0.0
        s["ink"] = float((box.mean(axis=2) < 0.9).mean()) if box.size else 0.0
