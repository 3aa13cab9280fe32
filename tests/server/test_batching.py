"""Dynamic batching: concurrent Infer calls are answered from shared forward passes, each
caller gets exactly its own rows, and a lone caller is not delayed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnd.client import Client
from cnnd.core import Sequential, save_model
from cnnd.server.app import create_server
from cnnd.server.config import ServerConfig
from tests.conftest import SMALL_SPEC


@pytest.fixture
def batched(tmp_path: Path) -> Iterator[tuple[object, str, Sequential]]:
    config = ServerConfig(port=0, data_dir=str(tmp_path / "data"))
    config.batching.max_batch_size = 16
    config.batching.max_queue_delay_us = 20_000  # generous, so batches form under test load
    srv, port = create_server(config)
    srv.start()
    model = Sequential.from_spec(SMALL_SPEC, seed=4)
    save_model(tmp_path / "m.npz", model)
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_until_ready(60)
        c.import_model(tmp_path / "m.npz", name="m")
    try:
        yield srv, f"127.0.0.1:{port}", model
    finally:
        srv.stop(5)


def test_concurrent_calls_share_batches_and_get_their_own_rows(batched) -> None:  # type: ignore[no-untyped-def]
    srv, target, model = batched
    rng = np.random.default_rng(0)
    inputs = [rng.random((1 + i % 3, 1, 8, 8), dtype=np.float32) for i in range(48)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(k: int) -> None:
        try:
            with Client(target) as c:
                start.wait()
                for i in range(k, len(inputs), 16):
                    results[i] = c.infer("m", inputs[i]).logits
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], model.forward(x), rtol=1e-5, atol=1e-6)
    registry = srv.deps.metrics.registry  # type: ignore[attr-defined]
    samples = registry.get_sample_value("cnnd_inference_batch_size_sum")
    passes = registry.get_sample_value("cnnd_inference_batch_size_count")
    assert samples == sum(len(x) for x in inputs)
    assert passes < len(inputs), "no two calls were ever batched together"


def test_batch_limit_and_oversized_calls(batched) -> None:  # type: ignore[no-untyped-def]
    _, target, model = batched
    x = np.random.default_rng(1).random((40, 1, 8, 8), dtype=np.float32)  # > max_batch_size
    with Client(target) as c:
        np.testing.assert_allclose(c.infer("m", x).logits, model.forward(x), rtol=1e-5, atol=1e-6)
