"""`fflora serve` in a child process: started, waited for, and stopped by its process id.

The serving benchmark and the server tests use it; the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Run `fflora serve ARGS --host 127.0.0.1 --port PORT` (or another OpenAI-compatible server's
    `program`, e.g. vLLM's, that takes the same two options and answers /health), logging to `log_path`.

        with ServerProcess(["--model", folder, "--adapter", f"a={path}"], log) as server:
            httpx.get(f"{server.url}/v1/models")
    """

    def __init__(self, args: list[str], log_path: str | os.PathLike, port: int | None = None,
                 ready_timeout_s: float = 180.0, program: list[str] | None = None) -> None:
        self.port = port  # None: a free port, chosen when starting (after earlier servers bound theirs)
        self.args, self.log_path, self.ready_timeout_s = list(args), Path(log_path), ready_timeout_s
        self.program = program or [sys.executable, "-m", "fflora.cli", "serve"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.port = self.port or free_port()
        cmd = [*self.program, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{' '.join(self.program[-2:])} exited with code {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200 and self.proc.poll() is None:
                    return self  # (still running: not another server that holds the port)
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{' '.join(self.program[-2:])} did not answer /health within {self.ready_timeout_s:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it has not exited within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
