"""Dynamic batching: concurrent Infer calls are answered from shared forward passes, each
caller gets exactly its own rows, and a lone caller is not delayed. Each model's own policy
(max batch size, queue delay, off) is honoured, validated, updated live and kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnnd.client import Batching, Client, InvalidArgument, NotFound
from cnnd.core import Sequential, save_model
from cnnd.server.app import create_server
from cnnd.server.batching import Batcher
from cnnd.server.config import BatchingConfig, ServerConfig
from cnnd.server.registry import Loaded
from cnnd.server.store.base import ModelRecord
from cnnd.v1 import models_pb2
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


# --- per-model policies ---------------------------------------------------------------------


def spy(srv: object, name: str) -> list[tuple[int, str]]:
    """Records every forward pass of model ``name`` (its latest version, as the server built
    it) as (samples, name of the thread that ran it). Each pass is slowed to 3 ms, so that the
    calls of other clients queue up meanwhile and batches fill up whenever batching is on."""
    loaded = srv.deps.registry.load(name)  # type: ignore[attr-defined]
    passes: list[tuple[int, str]] = []
    forward = loaded.model.forward

    def recording(x: np.ndarray, train: bool = False) -> np.ndarray:
        passes.append((len(x), threading.current_thread().name))
        time.sleep(0.003)
        return forward(x, train)

    loaded.model.forward = recording  # type: ignore[method-assign]
    return passes


def load(target: str, model: Sequential, names: list[str], threads: int = 16,
         calls: int = 8) -> None:  # fmt: skip
    """``threads`` clients at once, spread evenly over the models ``names``, each making
    ``calls`` one-sample Infer calls; every answer is checked against the model's own forward
    pass."""
    x = np.random.default_rng(2).random((1, 1, 8, 8), dtype=np.float32)
    expected = model.forward(x)
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(name: str) -> None:
        try:
            with Client(target) as c:
                start.wait()
                for _ in range(calls):
                    logits = c.infer(name, x).logits
                    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
        except BaseException as e:  # surfaced below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(names[k % len(names)],))
            for k in range(threads)]  # fmt: skip
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []


def sizes(passes: list[tuple[int, str]]) -> list[int]:
    return [n for n, _ in passes]


def test_each_model_batches_up_to_its_own_limit(batched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv, target, model = batched  # the server's default max_batch_size is 16
    with Client(target) as c:
        c.import_model(tmp_path / "m.npz", name="narrow", batching=Batching(max_batch_size=2))
        c.import_model(tmp_path / "m.npz", name="wide", batching=Batching(max_batch_size=6))
    narrow, wide = spy(srv, "narrow"), spy(srv, "wide")
    load(target, model, ["narrow", "wide"])
    assert sum(sizes(narrow)) == sum(sizes(wide)) == 8 * 8  # every call, once
    assert max(sizes(narrow)) <= 2 and max(sizes(wide)) <= 6
    assert max(sizes(wide)) > 2, "wide never batched beyond narrow's limit"


def test_a_model_without_batching_runs_each_call_alone(batched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv, target, model = batched
    with Client(target) as c:
        solo = c.import_model(tmp_path / "m.npz", name="solo", batching=Batching(enabled=False))
    assert solo.batching == Batching(enabled=False)
    passes = spy(srv, "solo")
    load(target, model, ["solo"])
    assert sizes(passes) == [1] * (16 * 8)
    # In the callers' own threads: no queue, no worker.
    assert all(thread.startswith("cnnd-rpc") for _, thread in passes), set(passes)
    assert all(key[0] != solo.id for key in srv.deps.batcher._queues)


def test_a_policy_update_takes_effect_on_the_next_calls(batched) -> None:  # type: ignore[no-untyped-def]
    srv, target, model = batched
    passes = spy(srv, "m")
    with Client(target) as c:
        load(target, model, ["m"])
        assert max(sizes(passes)) > 1  # the server's defaults batch

        updated = c.update_model("m", batching=Batching(max_batch_size=1))
        assert updated.batching == Batching(max_batch_size=1)
        passes.clear()
        load(target, model, ["m"])
        assert sizes(passes) == [1] * (16 * 8)
        assert any(thread.startswith("cnnd-batch") for _, thread in passes)  # still queued

        c.update_model("m", batching=Batching(enabled=False), fields=["enabled"])
        passes.clear()
        load(target, model, ["m"])
        assert all(thread.startswith("cnnd-rpc") for _, thread in passes)

        # Back to the defaults: batching on, and max_batch_size unset again.
        assert c.update_model("m", batching=Batching()).batching == Batching()
        passes.clear()
        load(target, model, ["m"])
        assert max(sizes(passes)) > 1


def test_policies_are_validated_before_anything_is_stored(batched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, target, _ = batched
    bad = {
        "batching.max_batch_size": [Batching(max_batch_size=0), Batching(max_batch_size=4097)],
        "batching.max_queue_delay_us": [Batching(max_queue_delay_us=-1),
                                        Batching(max_queue_delay_us=1_000_001)],
    }  # fmt: skip
    with Client(target) as c:
        for field, policies in bad.items():
            for policy in policies:
                with pytest.raises(InvalidArgument) as info:
                    c.create_model(SMALL_SPEC, name="refused", batching=policy)
                assert set(info.value.fields) == {field}, info.value
                with pytest.raises(InvalidArgument) as info:
                    c.update_model("m", batching=policy)
                assert set(info.value.fields) == {field}, info.value
                with pytest.raises(InvalidArgument) as info:
                    c.import_model(tmp_path / "m.npz", name="refused", batching=policy)
                assert set(info.value.fields) == {f"header.{field}"}, info.value
        assert "refused" not in [m.name for m in c.list_models()]
        assert c.get_model("m").batching == Batching()  # the refused updates changed nothing

        # The bounds themselves are allowed (--max-infer-batch is 4096 here).
        edge = Batching(max_batch_size=4096, max_queue_delay_us=1_000_000)
        assert c.create_model(SMALL_SPEC, name="edge", batching=edge).batching == edge
        edge = Batching(max_batch_size=1, max_queue_delay_us=0)
        assert c.update_model("edge", batching=edge).batching == edge

        # A field mask naming anything but the policy's fields.
        request = models_pb2.UpdateModelRequest(model_id="m")
        request.batching.max_batch_size = 4
        request.update_mask.paths.extend(["batching.max_batch_size", "name"])
        with pytest.raises(grpc.RpcError) as rpc:
            c.stub.UpdateModel(request, timeout=10)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "update_mask" in rpc.value.details()
        assert c.get_model("m").batching == Batching()


def test_update_mask_changes_only_the_fields_it_names(batched) -> None:  # type: ignore[no-untyped-def]
    _, target, _ = batched
    with Client(target) as c:
        c.update_model("m", batching=Batching(max_batch_size=8, max_queue_delay_us=100))
        request = models_pb2.UpdateModelRequest(model_id="m")
        request.batching.max_batch_size = 4
        request.batching.max_queue_delay_us = 999  # not named by the mask: ignored
        request.update_mask.paths.append("batching.max_batch_size")
        reply = c.stub.UpdateModel(request, timeout=10)
        assert Batching.from_proto(reply.model.batching) == Batching(4, 100)
        # No mask: the fields the request sets (AIP-134).
        request = models_pb2.UpdateModelRequest(model_id="m")
        request.batching.disabled = True
        reply = c.stub.UpdateModel(request, timeout=10)
        assert Batching.from_proto(reply.model.batching) == Batching(4, 100, enabled=False)
        # A named field the request leaves unset returns to the server's default.
        request = models_pb2.UpdateModelRequest(model_id="m")
        request.update_mask.paths.append("batching.max_queue_delay_us")
        reply = c.stub.UpdateModel(request, timeout=10)
        assert Batching.from_proto(reply.model.batching) == Batching(4, None, enabled=False)
        with pytest.raises(NotFound):
            c.update_model("missing", batching=Batching())


def test_policies_survive_a_restart(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=str(tmp_path / "data"))
    srv, port = create_server(config)
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_until_ready(60)
            c.create_model(SMALL_SPEC, name="a", batching=Batching(max_batch_size=3))
            c.create_model(SMALL_SPEC, name="b")
            c.update_model("b", batching=Batching(max_queue_delay_us=0, enabled=False))
    finally:
        srv.stop(5)
    srv, port = create_server(config)
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_until_ready(60)
            assert c.get_model("a").batching == Batching(max_batch_size=3)
            assert c.get_model("b").batching == Batching(max_queue_delay_us=0, enabled=False)
        # ...and it is what the batcher gets with each call.
        assert srv.deps.registry.load("a", allow_initial=True).record.batching.max_batch_size == 3
    finally:
        srv.stop(5)


# --- the queue itself: who runs, who waits --------------------------------------------------


class _Watched:
    """A model whose forward passes are slowed to ``seconds`` and watched: their sizes and the
    most that ever ran at once."""

    def __init__(self, seconds: float) -> None:
        self.model = Sequential.from_spec(SMALL_SPEC, seed=5)
        self.seconds = seconds
        self.sizes: list[int] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(x))
        time.sleep(self.seconds)
        try:
            return self.model.forward(x, train)
        finally:
            with self._lock:
                self.running -= 1


def _queue_of(watched: _Watched, delay_us: int) -> tuple[Batcher, Loaded]:
    config = BatchingConfig(max_batch_size=16, max_queue_delay_us=delay_us)
    record = ModelRecord(id="mdl_q", name="q", spec=SMALL_SPEC, seed=5, parameter_count=0,
                         create_time=0.0)  # fmt: skip
    return Batcher(config), Loaded(record, 1, watched)  # type: ignore[arg-type]


def test_a_call_arriving_while_the_worker_gathers_joins_its_batch() -> None:
    """X is queued while Y is still decoding, so the worker holds X and waits for Y (up to a
    300 ms delay). When Y arrives it must join that batch, not run alone beside it and leave
    X waiting out the whole delay."""
    watched = _Watched(0.0)
    batcher, loaded = _queue_of(watched, 300_000)
    x = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    watched.model.forward(np.concatenate([x, x]))  # first calls load kernels: not the point
    took: dict[str, float] = {}
    y_arrived = threading.Event()

    def call_y() -> None:
        with batcher.arriving(loaded) as run:
            y_arrived.set()
            time.sleep(0.02)  # decoding
            t = time.perf_counter()
            run(x)
            took["y"] = time.perf_counter() - t

    ty = threading.Thread(target=call_y)
    ty.start()
    y_arrived.wait(5)
    with batcher.arriving(loaded) as run:
        t = time.perf_counter()
        got = run(x)
        took["x"] = time.perf_counter() - t
    ty.join(5)
    np.testing.assert_allclose(got, watched.model.forward(x), rtol=1e-5, atol=1e-6)
    assert took["x"] < 0.15, f"X waited {took['x'] * 1e3:.0f} ms for a batch Y never joined"
    assert watched.sizes == [2]


def test_a_lone_pass_and_a_batch_never_overlap() -> None:
    """Calls that come while a lone caller's pass runs queue up and run together after it (the
    worker waits for the pass to end, within the delay): one pass at a time, and fewer passes
    than calls."""
    watched = _Watched(0.03)
    batcher, loaded = _queue_of(watched, 200_000)
    x = np.random.default_rng(4).random((1, 1, 8, 8), dtype=np.float32)
    expected = watched.model.forward(x)
    errors: list[BaseException] = []

    def call(pause: float) -> None:
        try:
            time.sleep(pause)
            with batcher.arriving(loaded) as run:
                np.testing.assert_allclose(run(x), expected, rtol=1e-5, atol=1e-6)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(0.005 * i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert watched.most == 1, "a lone pass and a batch ran at the same time"
    assert sum(watched.sizes) == 6 and len(watched.sizes) < 6


def test_a_refresh_during_a_lookup_is_not_undone() -> None:
    """An UpdateModel that lands while another call is reading the model's record from the
    store must not be undone by that call caching the record it read (which predates it)."""
    from cnnd.core.spec import SpecLimits
    from cnnd.server.registry import Registry

    record = ModelRecord(id="mdl_r", name="r", spec=SMALL_SPEC, seed=0, parameter_count=0,
                         create_time=0.0)  # fmt: skip
    reads: list[int] = []

    class Store:
        def get_model(self, key: str) -> ModelRecord:
            reads.append(1)
            if len(reads) == 1:
                registry.refresh(record.id)  # the update commits while this read is in flight
            return record

    registry = Registry(Store(), SpecLimits())  # type: ignore[arg-type]
    registry.load("r", allow_initial=True)
    registry.load("r", allow_initial=True)
    assert len(reads) == 2, "the second call served the record read before the update"
