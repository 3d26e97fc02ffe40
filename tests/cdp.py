"""Drive headless Chromium over the DevTools protocol (no downloaded browser, no driver)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--hide-scrollbars"]  # fmt: skip
COUNT_IMAGES = "Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        params.update(captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})  # fmt: skip
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
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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
