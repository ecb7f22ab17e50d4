"""`gradindex serve` as a real subprocess on a free loopback port, for the API, browser and load tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """``gradindex serve INDEX --port 0 *args``, started and waited for; ``url`` is where it listens."""

    def __init__(self, index: Path, *args: str, env: dict | None = None, timeout: float = 300):
        self.process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", str(index), "--port", "0", *args], cwd=ROOT,
                                        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        line = self.process.stdout.readline()  # blocks until the model and index are loaded (or the server fails)
        found = re.search(r"at (http://\S+?)/? ", line)
        if not found:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.process.stderr.read()[-2000:]}")
        self.url, self.ready_seconds = found.group(1), time.monotonic() - self.started

    def call(self, path: str, body=None, *, token: str | None = None, raw: bytes | None = None) -> tuple[int, object]:
        """(status, decoded JSON or text) of a GET (no body) or POST."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(self.url + path, data, headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, text, kind = response.status, response.read().decode(), response.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, text, kind = e.code, e.read().decode(), e.headers.get("content-type", "")
        return status, json.loads(text) if "json" in kind else text

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()
