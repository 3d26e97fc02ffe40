"""Drive headless Chromium over the DevTools protocol (no downloaded browser, no driver)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--hide-scrollbars",
]
COUNT_IMAGES = "Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(app: Path, run: Path, **env: str):
    """A headless Streamlit server for ``app`` on run folder ``run``; yields its base URL.

    Waits up to 60 s for the health endpoint; terminated (then killed) on exit. ``env`` adds
    environment variables (e.g. ``USER``, which the dashboard records as the reviewer).
    """
    port = _port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", **env)
    flags = {
        "server.headless": "true",
        "server.address": "127.0.0.1",
        "server.port": str(port),
        "server.fileWatcherType": "none",
        "client.toolbarMode": "viewer",
    }
    args = [a for k, v in flags.items() for a in (f"--{k}", v)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(app), *args, "--", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "streamlit did not start"
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def _session(
    ws_url: str, url: str, out: Path, min_images: int, timeout: float, full_page: bool
) -> int:
    import websockets  # streamlit's server stack brings it

    ws = await websockets.connect(ws_url, max_size=200 * 1024 * 1024)
    ids = iter(range(1, 1_000_000))

    async def call(method: str, **params):
        i = next(ids)
        await ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("id") == i:
                return msg.get("result", {})

    await call("Page.enable")
    await call("Page.navigate", url=url)
    deadline, n = time.time() + timeout, 0
    while time.time() < deadline:
        res = await call("Runtime.evaluate", expression=COUNT_IMAGES, returnByValue=True)
        n = res.get("result", {}).get("value", 0) or 0
        if n >= min_images:
            await asyncio.sleep(2.5)  # let the last paints and the sidebar animation land
            break
        await asyncio.sleep(0.5)
    params: dict = {"format": "png"}
    if full_page:
        size = (await call("Page.getLayoutMetrics"))["cssContentSize"]
        params.update(
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
    shot = await call("Page.captureScreenshot", **params)
    out.write_bytes(base64.b64decode(shot["data"]))
    await ws.close()
    return n


def screenshot_when_images_loaded(
    url: str, out: Path, min_images: int = 1, timeout: float = 60, full_page: bool = False
) -> int:
    """Open ``url`` in headless Chromium, wait until ``min_images`` images have loaded, save a PNG.

    Returns how many loaded images were seen. Waits on the page itself, since a Streamlit page
    renders only after a websocket round trip (``--screenshot`` would capture it empty).
    """
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    port = _port()
    # Chromium may still be writing its profile as it exits.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                exe,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_lift_soft_address_limit,
        )
        try:
            deadline = time.time() + 30
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/json/list", timeout=2
                    ) as r:
                        pages = [p for p in json.load(r) if p.get("type") == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            return asyncio.run(
                _session(pages[0]["webSocketDebuggerUrl"], url, out, min_images, timeout, full_page)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _lift_soft_address_limit() -> None:
    """Chromium reserves tens of GB of address space (V8 cage, PartitionAlloc) without using it
    and dies under ``ulimit -v``; give it the hard limit. Run the tests with ``ulimit -S -v`` so
    Python stays capped while the browser can start (the hard cap still bounds it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def address_limit_blocks_chromium() -> str | None:
    """A reason to skip when the hard address-space limit is too low for Chromium."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY and hard < 64 * 2**30:
        return (
            f"chromium cannot start under a hard address-space limit of {hard / 2**30:.0f} GiB; "
            "cap Python with a soft limit instead (`ulimit -S -v 8000000`)"
        )
    return None


class Browser:
    """One headless Chromium page driven like a person: real mouse clicks and key presses.

    Synchronous wrapper over the DevTools protocol; use as a context manager (the browser and
    its temporary profile are gone afterwards). Element lookups are JavaScript expressions that
    evaluate to an element (or null), so tests can name Streamlit widgets by their labels.
    """

    def __init__(self, width: int = 1400, height: int = 1000):
        self.size = (width, height)
        self.loop = asyncio.new_event_loop()
        self.ids = iter(range(1, 10_000_000))

    def __enter__(self) -> Browser:
        import websockets

        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        port = _port()
        flags = [f for f in FLAGS if not f.startswith("--window-size")]
        self.proc = subprocess.Popen(
            [
                chromium(),
                *flags,
                f"--window-size={self.size[0]},{self.size[1]}",
                f"--user-data-dir={self.profile.name}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_lift_soft_address_limit,
        )
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [p for p in json.load(r) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        self.ws = self.loop.run_until_complete(
            websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=200 * 1024 * 1024)
        )
        self.call("Page.enable")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.loop.run_until_complete(self.ws.close())
            self.ws = None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.profile.cleanup()
        self.loop.close()

    # -- protocol -------------------------------------------------------------------------
    def call(self, method: str, **params) -> dict:
        async def go():
            i = next(self.ids)
            await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
                if msg.get("id") == i:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

        return self.loop.run_until_complete(go())

    def js(self, expression: str):
        """Evaluate ``expression`` in the page; returns its JSON value (exceptions raise)."""
        res = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(
                f"JS failed: {res['exceptionDetails'].get('exception', {}).get('description')}"
            )
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(0.5)

    def wait(self, expression: str, timeout: float = 30, what: str = "") -> object:
        """Poll until ``expression`` is truthy; returns its value or raises ``TimeoutError``."""
        deadline = time.time() + timeout
        # Not there yet (a null on the way) counts as not yet, not as an error.
        as_value = (
            f"(() => {{ try {{ const v = ({expression}); return v instanceof Node ? true : v; }}"
            " catch (e) { return null; } })()"
        )
        while True:
            value = self.js(as_value)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what or expression}")
            time.sleep(0.2)

    def idle(self, settle: float = 0.6, timeout: float = 30) -> None:
        """Wait until Streamlit has finished running the script (no 'Running' indicator)."""
        time.sleep(settle)
        self.wait(
            "!document.querySelector('[data-testid=\"stStatusWidget\"]')",
            timeout,
            "the app to be idle",
        )
        time.sleep(0.3)

    # -- people-like input ----------------------------------------------------------------
    def click(self, element_js: str, what: str = "") -> None:
        """A real mouse click at the centre of the element ``element_js`` evaluates to."""
        box = self.wait(
            f"(() => {{ const e = {element_js}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
            what=what or element_js,
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def press(self, key: str) -> None:
        """Press one printable key with nothing focused (as a reviewer using shortcuts)."""
        self.js("document.activeElement && document.activeElement.blur()")
        code = f"Key{key.upper()}" if key.isalpha() else ""
        common = dict(key=key, code=code, windowsVirtualKeyCode=ord(key.upper()))
        self.call("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        self.call("Input.dispatchKeyEvent", type="keyUp", **common)

    def type(self, element_js: str, text: str) -> None:
        """Click into a text field, replace its text, and commit it with Enter."""
        self.click(element_js)
        self.js(f"(() => {{ const e = {element_js}; e.focus(); e.select(); }})()")
        self.call(
            "Input.dispatchKeyEvent",
            type="keyDown",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        self.call(
            "Input.dispatchKeyEvent",
            type="keyUp",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        if text:
            self.call("Input.insertText", text=text)
        self.call(
            "Input.dispatchKeyEvent",
            type="keyDown",
            key="Enter",
            code="Enter",
            windowsVirtualKeyCode=13,
            text="\r",
        )
        self.call(
            "Input.dispatchKeyEvent",
            type="keyUp",
            key="Enter",
            code="Enter",
            windowsVirtualKeyCode=13,
        )

    def screenshot(self, out: Path, full_page: bool = False) -> None:
        params: dict = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))


# JavaScript lookups for Streamlit widgets by their visible label or text.
def button(text: str) -> str:
    return (
        "Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim().split('\\n')[0].trim() === "
        f"{json.dumps(text)} && b.offsetParent)"
    )


def text_input(label: str) -> str:
    return f"document.querySelector('input[aria-label={json.dumps(label)}]')"


def widget(label: str, testid: str) -> str:
    return (
        f"Array.from(document.querySelectorAll('[data-testid=\"{testid}\"]')).find(w => "
        f"(w.querySelector('[data-testid=\"stWidgetLabel\"]') || {{}}).innerText === {json.dumps(label)})"
    )


def radio_option(text: str) -> str:
    """A radio option (or a tab) with this text."""
    return (
        'Array.from(document.querySelectorAll(\'[data-testid="stRadio"] label, button[role="tab"]\'))'
        f".find(l => l.innerText.trim() === {json.dumps(text)})"
    )


def select(b: Browser, label: str, option: str) -> None:
    """Open the selectbox named ``label`` and click ``option`` in its list."""
    b.click(f"({select_open(label)})", label)
    b.click(
        "Array.from(document.querySelectorAll('[role=\"option\"]')).find(o => o.innerText.trim() === "
        f"{json.dumps(option)})",
        f"option {option}",
    )


def select_open(label: str) -> str:
    """The button that opens the selectbox named ``label``."""
    return (
        f"document.querySelector('input[aria-label={json.dumps(label)}]')"
        ".closest('[data-testid=\"stSelectbox\"]').querySelector('button[aria-label=\"Open\"]')"
    )


def options() -> str:
    return "Array.from(document.querySelectorAll('[role=\"option\"]')).map(o => o.innerText.trim())"


def page_text() -> str:
    return "document.body.innerText"
