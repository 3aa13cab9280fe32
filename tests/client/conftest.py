"""Fixtures of the SDK and CLI tests: real servers over real channels, shared per module where
the tests only read (a trained model), fresh per test where they count or list things; a TCP
listener that never speaks HTTP/2; and a real gRPC server whose answers a test scripts (to
count retries).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnd.client import Client, Dataset, Model
from cnnd.v1 import models_pb2, service_pb2_grpc
from tests.conftest import SMALL_SPEC

SLOW_SPEC = {  # enough work per step that a job runs for seconds (cancel, queue, live bar)
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}
LINEAR_SPEC = {  # no nonlinearity: SGD with a huge learning rate diverges within a few steps
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}


@contextlib.contextmanager
def running_server(data_dir: Path, **config: Any) -> Iterator[Any]:
    """An in-process cnnd server on a free port; ``.target`` is its address."""
    from cnnd.server.app import create_server
    from cnnd.server.config import ServerConfig

    srv, port = create_server(ServerConfig(port=0, data_dir=str(data_dir), **config))
    srv.start()
    srv.target = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        with Client(srv.target, timeout=30) as c:  # type: ignore[attr-defined]
            c.wait_until_ready(120)
        yield srv
    finally:
        srv.stop(2)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One server for a module's tests that only add uniquely named things and read them."""
    with running_server(tmp_path_factory.mktemp("shared") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def shared(shared_server: Any) -> Iterator[Client]:
    with Client(shared_server.target, timeout=30) as c:
        yield c


@dataclass
class Trained:
    """A model trained once on the digits (version 1), its dataset, and the data."""

    model: Model
    dataset: Dataset
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="module")
def trained(shared: Client, digits: tuple[np.ndarray, np.ndarray]) -> Trained:
    x, y = digits
    model = shared.create_model(SMALL_SPEC, name="trained", seed=0)
    data = shared.upload_dataset(x, y, name="digits")
    job = shared.train(model, data, epochs=3, batch_size=32, optimizer="adam", lr=0.01)
    final = job.wait(progress=False, timeout=120)
    assert final.state == "SUCCEEDED", final.failure_reason
    return Trained(shared.get_model(model), data, x, y)


@pytest.fixture
def silent_tcp() -> Iterator[str]:
    """The address of a TCP listener that accepts connections and never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        sock.close()
        for conn in held:
            conn.close()


@dataclass
class Script:
    """How a ScriptedService answers: ``fail[method]`` calls fail UNAVAILABLE first."""

    fail: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            n = self.calls[method] = self.calls.get(method, 0) + 1
        if n <= self.fail.get(method, 0):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method} attempt {n}: try again")


class ScriptedService(service_pb2_grpc.CnndServiceServicer):
    """A real gRPC server for the CnndService contract whose failures a test scripts."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.script.answer("ListModels", context)
        return models_pb2.ListModelsResponse(models=[models_pb2.Model(id="mdl_1", name="m")])

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.script.answer("GetModel", context)
        return models_pb2.GetModelResponse(model=models_pb2.Model(id="mdl_1", name="m"))

    def CreateModel(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.script.answer("CreateModel", context)
        return models_pb2.CreateModelResponse(model=models_pb2.Model(id="mdl_2", name="n"))


@pytest.fixture
def scripted() -> Iterator[Callable[..., tuple[str, Script]]]:
    """``scripted(ListModels=2)``: a server whose first two ListModels fail UNAVAILABLE;
    returns its address and the Script that counts the calls."""
    servers: list[grpc.Server] = []

    def make(**fail: int) -> tuple[str, Script]:
        script = Script(fail=dict(fail))
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service_pb2_grpc.add_CnndServiceServicer_to_server(ScriptedService(script), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        servers.append(srv)
        return f"127.0.0.1:{port}", script

    yield make
    for srv in servers:
        srv.stop(0)
