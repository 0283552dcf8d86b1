"""Worker processes started and stopped from Python: the demo, the tests and the load tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: In a text line or a JSON one (HOTSWAP_LOG_FORMAT=json), where the URL ends at the closing quote.
_LISTENING = re.compile(r'status server listening on (http://[^\s"]+)')
#: What a worker logs once it consumes its queues (worker.app): ready, unless something changed since.
READY_LINE = re.compile(r"worker \S+ ready\b")


class WorkerStartFailed(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    """`python -m worker` with its log in a file; its status port is picked by the OS."""

    models: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    _log_start: int = 0

    def start(self, timeout_s: float = 120.0) -> WorkerProcess:
        command = [sys.executable, "-m", "worker", "--status-port", "0", *self.args]
        for model in self.models:
            command += ["--model", model]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.url = ""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until /readyz says ready. The log is read every 10 ms and /readyz asked once the worker
        has logged that it is ready (and every 0.2 s besides): a start is timed to ~10 ms
        (benchmark 7 times it) without a stream of requests to a worker busy loading."""
        deadline = time.monotonic() + timeout_s
        asked_at, read_to, written = 0.0, self._log_start, ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise WorkerStartFailed(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            with self.log_path.open("rb") as log:  # what this start wrote since the last look
                log.seek(read_to)
                new = log.read()
            read_to += len(new)
            written += new.decode(errors="replace")
            if not self.url:
                found = _LISTENING.search(written)
                self.url = found.group(1) if found else ""
            due = READY_LINE.search(written) is not None or time.monotonic() - asked_at >= 0.2
            if self.url and due:
                asked_at = time.monotonic()
                if self.get("/readyz", ok_only=False).get("ready"):
                    return
            time.sleep(0.01)
        raise WorkerStartFailed(f"worker not ready within {timeout_s} s:\n{self.log_tail()}")

    def get(self, path: str, *, ok_only: bool = True) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            if ok_only:
                raise
            return dict(json.loads(exc.read()))
        except OSError:
            if ok_only:
                raise
            return {}

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return str(response.read().decode())

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited in time; returns the exit code."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
