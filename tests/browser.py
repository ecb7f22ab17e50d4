"""A real headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fds 3 and 4,
NUL-terminated JSON), with the standard library only: navigate, type, click, read the page, screenshot."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


class Browser:
    def __init__(self, profile: Path, width: int = 1200, height: int = 1400):
        to_chrome, self._commands = os.pipe()
        self._answers, from_chrome = os.pipe()

        def wire():  # the child's fd 3 reads our commands, its fd 4 writes its answers
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._next, self._buffer, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params, **({"sessionId": self.session} if self.session else {})}
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer.get("result", {})
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self._buffer += chunk
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        """Poll until ``expression`` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field and type ``text`` as keyboard input (the page sees input events, not a set value)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def search(self, prompt: str, completion: str, k: int) -> int:
        """On gradindex's search page: type a query, set k, submit, and wait for the result cards (their count)."""
        self.type_into("#prompt", prompt)
        self.type_into("#completion", completion)
        self.evaluate("document.getElementById('k').select()")
        self.send("Input.insertText", text=str(k))
        self.evaluate("document.getElementById('submit').click()")
        return self.wait_for("document.querySelectorAll('li.hit').length")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for fd in (self._commands, self._answers):
            os.close(fd)
