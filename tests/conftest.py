"""Shared fixtures: a real server on a free port with a temporary data dir, a real channel,
and helpers to run `cnnd serve` as a separate process (for kill -9 and SIGTERM tests).

Tests that need an outside program (Prometheus, PostgreSQL, podman) skip when it is missing,
unless CNND_REQUIRE_ALL=1 (set by .ci/run), where a missing program fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from cnnd.client import Client

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("CNND_REQUIRE_ALL") == "1"

SMALL_SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}


def need_program(name: str) -> str:
    """The path of an outside program, or skip (fail under CNND_REQUIRE_ALL=1)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    """A started in-process server on a free port, stopped after the test."""
    from cnnd.server.app import create_server
    from cnnd.server.config import ServerConfig

    srv, port = create_server(ServerConfig(port=0, data_dir=str(tmp_path / "data")))
    srv.start()
    srv.target = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop(5)


@pytest.fixture
def client(server: object) -> Iterator[Client]:
    with Client(server.target, timeout=30) as c:  # type: ignore[attr-defined]
        c.wait_until_ready(60)
        yield c


class ServerProcess:
    """`cnnd serve` in a child process (its own process group), for crash and signal tests."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cnnd.client.cli", "serve", "--port", str(self.port),
               "--data-dir", str(data_dir), *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),  # noqa: SIM115
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip

    def client(self, **kwargs: object) -> Client:
        return Client(self.target, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, timeout: float = 120) -> None:
        with self.client(timeout=5) as c:
            c.wait_until_ready(timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind happens in the server."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    """Start `cnnd serve` processes: ``spawn(data_dir, *flags)``; all are killed at the end."""
    started: list[ServerProcess] = []

    def make(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        p = ServerProcess(data_dir, *args, env=env)
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        p.close()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
