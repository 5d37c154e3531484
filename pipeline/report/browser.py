"""Open a report in headless Chromium and check it the way a reader would see it.

Chromium is driven over the Chrome DevTools protocol (a websocket; ``websocket-client``): the
page is loaded from its file, and everything the browser's console shows is collected (console
errors, uncaught exceptions, failed loads, Content-Security-Policy violations), as is every network
request (a self-contained report makes none). Then each ``<img>`` is checked: loaded, with a size,
and not blank (its pixels drawn on a canvas are not all one colour). A screenshot is optional.

    from pipeline.report.browser import check_page
    result = check_page("report.html", screenshot="shot.png")
    assert result.ok, result.problems()
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: executables tried in order (``CHROMIUM`` in the environment comes first)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

#: runs in the page after load: per image, whether it loaded and how many distinct colours a
#: 64x64 downsample of it has (1 = blank); collected as JSON
PROBE = r"""
(() => {
  const out = [];
  for (const img of Array.from(document.images)) {
    const r = {name: img.dataset.name || img.alt || img.src.slice(0, 40), complete: img.complete,
               width: img.naturalWidth, height: img.naturalHeight, shown_width: img.clientWidth,
               colours: 0, error: null};
    try {
      const c = document.createElement('canvas'); c.width = 64; c.height = 64;
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0, 64, 64);
      const d = ctx.getImageData(0, 0, 64, 64).data;
      const seen = new Set();
      for (let i = 0; i < d.length; i += 4) {
        seen.add((d[i] >> 3) + ',' + (d[i+1] >> 3) + ',' + (d[i+2] >> 3));
        if (seen.size > 50) break;
      }
      r.colours = seen.size;
    } catch (e) { r.error = String(e); }
    out.push(r);
  }
  return JSON.stringify({images: out, title: document.title, height: document.documentElement.scrollHeight,
                         sections: document.querySelectorAll('section').length});
})()
"""


def find_chromium() -> str | None:
    for name in ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + list(CANDIDATES):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    url: str
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    title: str = ""
    sections: int = 0
    height: int = 0
    screenshot: Path | None = None

    def blank_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or not i["width"] or not i["height"] or i["colours"] < 2
                or i.get("error")]

    def problems(self) -> list[str]:
        out = [f"console: {c}" for c in self.console]
        out += [f"network request: {r}" for r in self.requests]
        out += [f"image {i['name']!r} is blank or did not load: {i}" for i in self.blank_images()]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


class _DevTools:
    """A minimal DevTools client: commands with ids, events collected while waiting."""

    def __init__(self, ws_url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        my = self.next_id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = self._recv(deadline)
            if msg is None:
                continue
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e["method"] == method for e in self.events):
            return True
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = self._recv(deadline)
            if msg is not None and "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return True
        return False

    def _recv(self, deadline: float) -> dict | None:
        """The next message, or None when none came before ``deadline``."""
        import websocket

        self.ws.settimeout(max(0.05, deadline - time.time()))
        try:
            return json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return None

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


def _console_lines(events: list[dict]) -> tuple[list[str], list[str]]:
    console, requests = [], []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            console.append(f"{p['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            console.append(f"exception: {d.get('text', '')} {d.get('exception', {}).get('description', '')}".strip())
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            entry = p["entry"]
            console.append(f"{entry['level']} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not url.startswith(("data:", "file:", "about:")):
                requests.append(url)
    return console, requests


def check_page(html: Path, *, screenshot: Path | None = None, width: int = 1280, height: int = 900,
               full_page: bool = False, timeout: float = 60.0, chromium: str | None = None) -> PageCheck:
    """Load ``html`` in headless Chromium and check it (see the module docstring). ``screenshot``:
    save a PNG of the first ``height`` pixels (or the whole page with ``full_page``)."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium executable (apt-get install chromium, or set CHROMIUM=...)")
    html = Path(html).resolve()
    profile = Path(tempfile.mkdtemp(prefix="report-chromium-"))
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
           "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
           f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    client = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"{exe} exited with code {proc.returncode} before it was ready")
            if time.time() > deadline:
                raise TimeoutError(f"{exe} did not start within {timeout:.0f}s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            targets = json.loads(r.read())
        page = next(t for t in targets if t.get("type") == "page")
        client = _DevTools(page["webSocketDebuggerUrl"], timeout)
        for domain in ("Page", "Runtime", "Log", "Network"):
            client.send(f"{domain}.enable")
        client.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": False})
        client.events.clear()
        client.send("Page.navigate", {"url": html.as_uri()})
        if not client.wait_for("Page.loadEventFired", timeout):
            raise TimeoutError(f"{html} did not finish loading within {timeout:.0f}s")
        time.sleep(0.3)  # late console messages
        probe = json.loads(client.send("Runtime.evaluate", {"expression": PROBE, "returnByValue": True})["result"]["value"])
        client.wait_for("__none__", 0.2)
        console, requests = _console_lines(client.events)
        result = PageCheck(html.as_uri(), console, requests, probe["images"], probe["title"], probe["sections"],
                           probe["height"])
        if screenshot is not None:
            h = probe["height"] if full_page else min(height, probe["height"])
            shot = client.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page,
                                                          "clip": {"x": 0, "y": 0, "width": width, "height": h,
                                                                   "scale": 1}}, timeout=timeout)
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            result.screenshot = Path(screenshot)
        try:
            client.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway below
            pass
        return result
    finally:
        if client is not None:
            client.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
