"""Headless Chromium driven over the DevTools protocol: open a page, read what its images loaded."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

from tests.ops.services import wait_for

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
    "--window-size=1400,1000",
)
IMAGES = "JSON.stringify(Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth]))"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, executable: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "Chromium's DevTools port")
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == message_id:
                return reply.get("result", {})

    def images(self, url: str, loaded_prefix: str, timeout: float = 90) -> list[list]:
        """Open ``url`` and wait until an image whose src starts with ``loaded_prefix`` has loaded."""
        self.call("Page.navigate", url=url)

        def loaded() -> list[list] | None:
            value = self.call("Runtime.evaluate", expression=IMAGES, returnByValue=True)["result"].get("value", "[]")
            images = json.loads(value)
            return images if any(src.startswith(loaded_prefix) and done and width > 0 for src, done, width in images) else None

        return wait_for(loaded, timeout, f"an image from {loaded_prefix} to load on {url}", interval=1.0)

    def all_images(self, url: str, timeout: float = 120) -> list[list]:
        """Open ``url`` and wait until every image on it has finished loading (or failed); returns them all."""
        self.call("Page.navigate", url=url)

        def settled() -> list[list] | None:
            state = self.call("Runtime.evaluate", expression="document.readyState", returnByValue=True)["result"].get("value")
            value = self.call("Runtime.evaluate", expression=IMAGES, returnByValue=True)["result"].get("value", "[]")
            images = json.loads(value)
            return images if state == "complete" and images and all(done for _, done, _ in images) else None

        return wait_for(settled, timeout, f"every image on {url} to load", interval=1.0)

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)
