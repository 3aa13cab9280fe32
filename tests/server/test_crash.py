"""Crash safety: a server killed with SIGKILL at several points of training — mid-epoch, half
way through a checkpoint write, between a checkpoint's fsync and its rename, between a new
version's weights file and its row — restarts with an intact store and every job ends with the
weights of an uninterrupted run. SIGTERM drains: NOT_SERVING at once, a checkpoint, exit 0, and
the job resumes on the next start."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnd.client import Client
from cnnd.core import load_model, load_npz
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.3},
        {"type": "linear", "out_features": 10},
    ],
}
TRAIN = dict(epochs=4, batch_size=4, optimizer="adam", lr=0.003, seed=11, validation=0.2,
             checkpoint_every=1)  # fmt: skip
SAMPLES = 800


def _submit(c: Client, digits: tuple[np.ndarray, np.ndarray]) -> str:
    x, y = digits
    c.wait_until_ready(120)
    c.create_model(SPEC, name="m", seed=2)
    c.upload_dataset(x[:SAMPLES], y[:SAMPLES], name="d")
    return c.train("m", "d", **TRAIN).id


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory, digits) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Weights of the same job run without interruption, in this process."""
    from cnnd.server.app import create_server
    from cnnd.server.config import ServerConfig

    d = tmp_path_factory.mktemp("reference")
    srv, port = create_server(ServerConfig(port=0, data_dir=str(d / "data")))
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            job = _submit(c, digits)
            assert c.wait_job(job, progress=False).state == "SUCCEEDED"
            return load_model(c.export_model("m", d / "m.npz")).state_dict()
    finally:
        srv.stop(5)


def _temporaries(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.name.endswith(".tmp")]


def _check_store(data_dir: Path) -> None:
    """SQLite reports no corruption, no temporary file is left, and every archive in the
    store is complete."""
    with sqlite3.connect(data_dir / "cnnd.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _temporaries(data_dir) == []
    for archive in (data_dir / "blobs").rglob("*.npz"):
        load_npz(archive)  # raises on a truncated file


def _finish(spawn, data_dir: Path, job_id: str, tmp_path: Path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Restart on the crashed data dir and let the job finish; its final weights."""
    with sqlite3.connect(data_dir / "cnnd.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    left = _temporaries(data_dir)  # what the crash left half written
    server = spawn(data_dir)
    server.wait_ready()
    assert not any(p.exists() for p in left), "start-up must remove half-written files"
    with server.client() as c:
        final = c.wait_job(job_id, progress=False, timeout=300)
        assert final.state == "SUCCEEDED", final.failure_reason
        assert final.attempts >= 2
        assert [e.epoch for e in final.history] == [1, 2, 3, 4]
        assert [v.version for v in c.get_model("m").versions] == [1]
        weights = load_model(c.export_model("m", tmp_path / "got.npz")).state_dict()
    assert server.terminate() == 0
    _check_store(data_dir)
    return weights


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "failpoint",
    ["checkpoint.partial=kill@2", "checkpoint.rename=kill@2", "version.commit=kill"],
)
def test_sigkill_at_a_failpoint(spawn, digits, expected, tmp_path: Path, failpoint: str) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "data"
    server = spawn(data_dir, env={"CNND_FAILPOINTS": failpoint})
    server.wait_ready()
    with server.client() as c:
        job_id = _submit(c, digits)
    assert server.proc.wait(300) == -9, "the failpoint should have killed the server"
    _assert_same(_finish(spawn, data_dir, job_id, tmp_path), expected)


def test_sigkill_mid_epoch(spawn, digits, expected, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "data"
    server = spawn(data_dir)
    server.wait_ready()
    with server.client() as c:
        job_id = _submit(c, digits)
        wait_for(lambda: (p := c.get_job(job_id).progress).epoch >= 2 and p.step > 20,
                 timeout=120, interval=0.02, what="the middle of epoch 2")  # fmt: skip
    server.kill()
    _assert_same(_finish(spawn, data_dir, job_id, tmp_path), expected)


@pytest.fixture
def health_of() -> Iterator:  # type: ignore[type-arg]
    channels: list[grpc.Channel] = []

    def check(target: str) -> str:
        if not channels:
            channels.append(grpc.insecure_channel(target))
        try:
            r = health_pb2_grpc.HealthStub(channels[0]).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name

    yield check
    for ch in channels:
        ch.close()


def test_sigterm_drains_checkpoints_and_resumes(spawn, digits, expected, tmp_path: Path,
                                                health_of) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    data_dir = tmp_path / "data"
    server = spawn(data_dir, "--grace-seconds", "15")
    server.wait_ready()
    with server.client() as c:
        job_id = _submit(c, digits)
        wait_for(lambda: (p := c.get_job(job_id).progress).epoch >= 2 and p.step > 20,
                 timeout=120, interval=0.02, what="the middle of epoch 2")  # fmt: skip
    assert health_of(server.target) == "SERVING"
    sent = time.monotonic()
    server.proc.send_signal(15)
    wait_for(lambda: health_of(server.target) != "SERVING", timeout=1, interval=0.02,
             what="NOT_SERVING within 1 s of SIGTERM")  # fmt: skip
    assert server.proc.wait(15) == 0
    assert time.monotonic() - sent < 15
    logs = server.logs()
    assert "checkpointed and queued for the next start" in logs
    _check_store(data_dir)
    got = _finish(spawn, data_dir, job_id, tmp_path)
    _assert_same(got, expected)
