"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
the browser reads commands on fd 3 and answers on fd 4, NUL-terminated JSON), so a test can
click and wait the way a person does, with no browser-automation package."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


class Browser:
    def __init__(self, executable: str, width: int = 1400, height: int = 1000):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def wire_fds():  # in the child: the pipe ends at the fds Chromium expects
            a, b = os.dup(to_browser), os.dup(from_browser)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--window-size={width},{height}",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            preexec_fn=wire_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.session = b"", 0, None
        self._frames: dict[str, str] = {}  # frame target -> its DevTools session

    def send(self, method: str, to_page: bool = True, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if to_page and self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        if self.session is None:
            target = self.send("Target.createTarget", to_page=False, url=url)["targetId"]
            self.session = self.send(
                "Target.attachToTarget", to_page=False, targetId=target, flatten=True
            )["sessionId"]
        else:
            self.send("Page.navigate", url=url)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """The expression's value once it is truthy. Errors while the page is still loading
        (no document.body yet) count as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, error = self.js(expression), None
            except RuntimeError as e:
                value, error = None, e
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout} s: {expression}") from error
            time.sleep(0.25)

    def frame_js(self, url_prefix: str, expression: str):
        """The value of an expression in the first frame whose address starts with
        url_prefix (e.g. the blob: of MLflow's artifact viewer, a sandboxed frame Chromium
        runs in a process of its own); None while there is no such frame."""
        targets = self.send("Target.getTargets", to_page=False)["targetInfos"]
        frame = next(
            (t for t in targets if t["type"] == "iframe" and t["url"].startswith(url_prefix)),
            None,
        )
        if frame is None:
            return None
        if frame["targetId"] not in self._frames:
            self._frames[frame["targetId"]] = self.send(
                "Target.attachToTarget", to_page=False, targetId=frame["targetId"], flatten=True
            )["sessionId"]
        page, self.session = self.session, self._frames[frame["targetId"]]
        try:
            return self.js(expression)
        finally:
            self.session = page

    def click(self, selector: str) -> None:
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})")
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for fd in (self._in, self._out):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)
