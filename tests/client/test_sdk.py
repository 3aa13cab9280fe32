"""The Python SDK against real servers over real channels: every public Client method, the
Job helpers, progress display, errors (always a CnndError, never a grpc.RpcError), retries
and deadlines.

Tests that count or list things get a fresh server (``client``); tests that only add uniquely
named things share one per module (``shared``, with a model ``trained`` once).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pty
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnnd.client import (
    AlreadyExists,
    Batching,
    Client,
    CnndError,
    DeadlineExceeded,
    FailedPrecondition,
    InferResult,
    InvalidArgument,
    Job,
    JobFailed,
    NotFound,
    Unavailable,
)
from tests.client.conftest import LINEAR_SPEC, SLOW_SPEC, Script, Trained
from tests.conftest import SMALL_SPEC, free_port, wait_for

SMALL_LAYERS = [layer["type"] for layer in SMALL_SPEC["layers"]]
MISSING_JOB = "job_0123456789abcdef"


def timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    """Run ``fn``; return what it raised (or None) and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:
        return e, time.monotonic() - t0
    return None, time.monotonic() - t0


# --- models and datasets -------------------------------------------------------------------


def test_models_create_get_list_delete(client: Client) -> None:
    m = client.create_model(SMALL_SPEC, name="small", seed=3)
    assert m.id.startswith("mdl_") and (m.name, m.seed) == ("small", 3)
    assert (m.input_shape, m.output_shape) == ((1, 8, 8), (10,))
    assert m.parameter_count == 4 * (9 + 1) + 10 * (4 * 4 * 4 + 1)
    assert m.macs > 0 and m.latest_version == 0 and m.versions == []
    assert [layer["type"] for layer in m.spec["layers"]] == SMALL_LAYERS
    assert m.created is not None and m.created.tzinfo is not None
    for ref in (m, m.id, m.name):  # an object, an id or a name
        assert client.get_model(ref) == m
    with pytest.raises(AlreadyExists):
        client.create_model(SMALL_SPEC, name="small")

    # list_models follows next_page_token across pages (the server's page is 50).
    names = ["small"] + [f"m{i:02d}" for i in range(54)]
    for name in names[1:]:
        client.create_model(SMALL_SPEC, name=name)
    assert [x.name for x in client.list_models()] == names

    client.delete_model("small")
    with pytest.raises(NotFound):
        client.get_model(m.id)
    with pytest.raises(NotFound):
        client.delete_model(m)
    for name in names[1:]:
        client.delete_model(client.get_model(name))
    assert client.list_models() == []
    with pytest.raises(TypeError, match="model must be a Model or an id/name"):
        client.get_model(42)  # type: ignore[arg-type]


def test_batching_is_set_updated_and_read_back(
    shared: Client, trained: Trained, tmp_path: Path
) -> None:
    m = shared.create_model(SMALL_SPEC, name="batched", batching=Batching(8, 200))
    assert m.batching == Batching(max_batch_size=8, max_queue_delay_us=200, enabled=True)
    assert shared.get_model("batched").batching == Batching(8, 200)
    assert shared.create_model(SMALL_SPEC, name="defaults").batching == Batching()

    # ``fields`` changes only those; without it the policy is replaced as a whole.
    m = shared.update_model(m, batching=Batching(1, 1, enabled=False), fields=["enabled"])
    assert m.batching == Batching(8, 200, enabled=False)
    m = shared.update_model("batched", batching=Batching(max_batch_size=4))
    assert m.batching == Batching(4) and m.id == shared.get_model("batched").id
    assert {x.name: x.batching for x in shared.list_models()}["batched"] == Batching(4)

    path = shared.export_model(trained.model, tmp_path / "m.npz")
    solo = shared.import_model(path, name="imported-solo", batching=Batching(enabled=False))
    assert solo.batching == Batching(enabled=False)
    x = trained.x[:4]
    np.testing.assert_array_equal(shared.infer(solo, x).logits,
                                  shared.infer(trained.model, x).logits)  # fmt: skip

    for fields in (["size"], []):  # not a field of Batching; nothing at all
        with pytest.raises(InvalidArgument, match="fields must name some of"):
            shared.update_model(m, batching=Batching(), fields=fields)
    with pytest.raises(InvalidArgument) as e:
        shared.update_model(m, batching=Batching(max_batch_size=-3))
    assert list(e.value.fields) == ["batching.max_batch_size"]
    with pytest.raises(NotFound):
        shared.update_model("no-such-model", batching=Batching())
    assert shared.get_model("batched").batching == Batching(4)


def test_upload_float32_uint8_and_3d_input(
    client: Client, digits: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = digits
    d = client.upload_dataset(x, y, name="f32")
    assert (d.sample_shape, d.dtype, d.sample_count, d.num_classes) == (
        (1, 8, 8), "float32", len(x), 10)  # fmt: skip
    assert d.size_bytes == x.nbytes + 4 * len(y)
    expected = hashlib.sha256(x.astype("<f4").tobytes() + y.astype("<i4").tobytes())
    assert d.sha256 == expected.hexdigest()

    # (N, H, W) uint8 gets a channel axis; progress=True with stderr captured (not a TTY)
    # prints one summary line instead of a bar.
    u8 = np.round(x[:, 0] * 255).astype(np.uint8)
    d8 = client.upload_dataset(u8, y, name="u8", progress=True)
    assert (d8.sample_shape, d8.dtype, d8.size_bytes) == (
        (1, 8, 8),
        "uint8",
        u8.nbytes + 4 * len(y),
    )
    err = capsys.readouterr().err
    assert err.startswith("upload u8: ") and "MB sent in" in err
    assert "\r" not in err and err.count("\n") == 1
    for ref in (d8, d8.id, "u8"):
        assert client.get_dataset(ref) == d8
    assert [ds.name for ds in client.list_datasets()] == ["f32", "u8"]

    # uint8 is scaled to [0, 1]: training on it works, and uint8 input infers like float.
    m = client.create_model(SMALL_SPEC, name="m")
    assert client.train(m, d8, epochs=2, batch_size=64, lr=0.1).wait(progress=False).state == (
        "SUCCEEDED"
    )
    r8 = client.infer(m, u8[:16, None])
    rf = client.infer(m, u8[:16, None].astype(np.float32) / 255)
    np.testing.assert_allclose(r8.logits, rf.logits, rtol=1e-5, atol=1e-5)

    with pytest.raises(InvalidArgument, match="x must be"):
        client.upload_dataset(x[:, 0, 0], y, name="flat")  # (N, W): no image
    with pytest.raises(InvalidArgument, match="y must be"):
        client.upload_dataset(x, y[:-1], name="short")
    with pytest.raises(InvalidArgument) as e:
        client.upload_dataset(x, y, name="one-class", num_classes=1)
    assert "header.num_classes" in e.value.fields
    with pytest.raises(AlreadyExists):
        client.upload_dataset(x[:10], y[:10], name="u8")

    client.delete_dataset("f32")
    client.delete_dataset(d8)
    with pytest.raises(NotFound):
        client.get_dataset(d8.id)
    with pytest.raises(NotFound):
        client.delete_dataset("f32")
    assert client.list_datasets() == []


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "options", "expected"),
    [
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
         {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
        ("adam", {"lr": 0.01}, {"lr": 0.01, "beta1": 0.9, "beta2": 0.999}),
        ("adamw", {"lr": 0.01, "weight_decay": 0.05}, {"lr": 0.01, "weight_decay": 0.05}),
    ],
)  # fmt: skip
def test_train_with_each_optimizer(
    shared: Client, trained: Trained, optimizer: str, options: dict, expected: dict
) -> None:
    m = shared.create_model(SMALL_SPEC, name=f"opt-{optimizer}", seed=1)
    job = shared.train(m, trained.dataset, epochs=2, batch_size=64, optimizer=optimizer,
                       validation=0.2, **options)  # fmt: skip
    assert job.state in ("QUEUED", "RUNNING") and job.model_id == m.id
    final = job.wait(progress=False, timeout=60)
    assert final.state == "SUCCEEDED", final.failure_reason
    assert final.result_version == 1 and len(final.history) == 2
    # The job keeps its request, with the server's defaults filled in, as plain values.
    assert final.config["epochs"] == 2 and final.config["validation_fraction"] == pytest.approx(0.2)
    assert set(final.config) & {"sgd", "adam", "adamw"} == {optimizer}
    for key, value in expected.items():
        assert final.config[optimizer][key] == pytest.approx(value), key
    last = final.history[-1]
    assert last.val_loss is not None and last.val_accuracy is not None
    assert last.learning_rate == pytest.approx(options["lr"])


def test_train_schedules_validation_dataset_and_patience(shared: Client, trained: Trained) -> None:
    x, y = trained.x, trained.y
    m = shared.create_model(SMALL_SPEC, name="schedules")
    step = shared.train(m, trained.dataset, epochs=3, batch_size=64, lr=0.1,
                        schedule={"kind": "step", "step_size": 1, "gamma": 0.5})  # fmt: skip
    cosine = shared.train(m, trained.dataset, epochs=4, batch_size=64, lr=0.1,
                          schedule={"kind": "cosine", "t_max": 4, "eta_min": 0.01})  # fmt: skip
    cosine_default = shared.train(m, trained.dataset, epochs=3, batch_size=64, lr=0.1,
                                  schedule="cosine")  # fmt: skip
    lrs = [[e.learning_rate for e in j.wait(progress=False).history]
           for j in (step, cosine, cosine_default)]  # fmt: skip
    assert lrs[0] == pytest.approx([0.1, 0.05, 0.025])
    # PyTorch's CosineAnnealingLR: eta_min + (lr - eta_min) * (1 + cos(pi * t / t_max)) / 2
    assert lrs[1] == pytest.approx(
        [0.01 + 0.09 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)]
    )
    assert lrs[2][0] == pytest.approx(0.1) and lrs[2][0] > lrs[2][1] > lrs[2][2] > 0

    # A validation dataset, by name or as an object.
    val = shared.upload_dataset(x[-300:], y[-300:], name="digits-val", num_classes=10)
    for ref in ("digits-val", val):
        final = shared.train(m, trained.dataset, epochs=1, batch_size=64, lr=0.1,
                             validation=ref).wait(progress=False)  # fmt: skip
        assert final.state == "SUCCEEDED"
        assert final.config["validation_dataset_id"] == val.id
        assert final.history[0].val_accuracy is not None

    # Early stopping: validation labels that disagree with the training labels get a higher
    # loss as the model learns, so patience=1 stops long before 40 epochs.
    rng = np.random.default_rng(0)
    noise = shared.upload_dataset(x[:400], rng.permutation(y[:400]), name="digits-noise",
                                  num_classes=10)  # fmt: skip
    stopped = shared.train(m, trained.dataset, epochs=40, batch_size=64, optimizer="adam",
                           lr=0.01, validation=noise, patience=1).wait(progress=False)  # fmt: skip
    assert stopped.state == "SUCCEEDED" and stopped.config["early_stopping_patience"] == 1
    assert 2 <= len(stopped.history) < 10

    with pytest.raises(InvalidArgument, match="schedule"):
        shared.train(m, trained.dataset, schedule={"kind": "step", "bogus": 1})
    with pytest.raises(InvalidArgument, match="schedule"):
        shared.train(m, trained.dataset, schedule="linear")
    with pytest.raises(InvalidArgument, match="optimizer"):
        shared.train(m, trained.dataset, optimizer="rmsprop")
    with pytest.raises(InvalidArgument) as e:
        shared.train(m, trained.dataset, validation=1.5)
    assert "validation_fraction" in e.value.fields


def test_jobs_list_filters_cancel_and_refresh(
    client: Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    fast = client.create_model(SMALL_SPEC, name="fast")
    slow = client.create_model(SLOW_SPEC, name="slow")
    data = client.upload_dataset(x, y, name="d")
    done = client.train(fast, data, epochs=1, batch_size=64).wait(progress=False)
    long = client.train(slow, data, epochs=1000, batch_size=4)  # runs until cancelled
    queued = client.train(fast, data, epochs=1, batch_size=64)  # one job at a time: waits
    wait_for(lambda: long.refresh().state == "RUNNING", timeout=30, what="the long job to run")
    now = queued.refresh()
    assert isinstance(now, Job) and (now.state, now.queue_position) == ("QUEUED", 1)
    assert client.get_job(queued.id).state == client.get_job(queued).state == "QUEUED"

    # wait(timeout) gives up on time even though a queued job sends no events.
    error, seconds = timed(lambda: queued.wait(progress=False, timeout=1))
    assert isinstance(error, TimeoutError) and "QUEUED" in str(error), error
    assert seconds < 4

    def ids(**filters: object) -> list[str]:
        return [j.id for j in client.list_jobs(**filters)]  # type: ignore[arg-type]

    assert ids() == [done.id, long.id, queued.id]
    assert ids(model=fast) == ids(model="fast") == [done.id, queued.id]
    assert ids(model=slow.id) == [long.id]
    assert ids(state="succeeded") == [done.id]
    assert ids(state="RUNNING") == [long.id]
    assert ids(state="queued") == [queued.id]
    with pytest.raises(InvalidArgument, match="state must be one of"):
        client.list_jobs(state="bogus")
    with pytest.raises(NotFound):
        client.list_jobs(model="nope")

    # Cancel a queued job (by id) and a running one (Job.cancel); both end CANCELLED.
    assert client.cancel_job(queued.id).id == queued.id
    long.cancel()
    for job in (long, queued):
        final = job.wait(progress=False, timeout=30)
        assert final.state == "CANCELLED" and final.result_version == 0, final
    assert ids(state="cancelled") == [long.id, queued.id]
    with pytest.raises(FailedPrecondition, match="already ended"):
        client.cancel_job(long)
    with pytest.raises(JobFailed, match="CANCELLED"):
        long.wait(progress=False, raise_on_failure=True)
    assert client.get_model(slow).latest_version == 0


def test_events_and_wait(shared: Client, trained: Trained) -> None:
    m = shared.create_model(SMALL_SPEC, name="events", seed=1)
    job = shared.train(m, trained.dataset, epochs=3, batch_size=32, lr=0.05)
    events = list(job.events())
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot" and set(kinds) <= {"snapshot", "state", "progress", "epoch"}
    assert all(e.job.id == job.id and e.time is not None for e in events)
    # A watcher that joins late sees the finished epochs in the snapshot, the rest live.
    live = [e.epoch.epoch for e in events if e.kind == "epoch" and e.epoch is not None]
    assert [h.epoch for h in events[0].job.history] + live == [1, 2, 3]
    assert events[-1].job.state == "SUCCEEDED" and events[-1].job.done

    final = job.wait(progress=False)
    assert final.state == "SUCCEEDED" and final.result_version == 1
    assert [h.epoch for h in final.history] == [1, 2, 3]
    assert final.started is not None and final.ended is not None and final.ended >= final.started
    assert job.refresh() == final
    # After the end: just the snapshot.
    assert [(e.kind, e.job.state) for e in final.events()] == [("snapshot", "SUCCEEDED")]


def test_wait_progress_without_a_terminal(
    shared: Client, trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    m = shared.create_model(SMALL_SPEC, name="lines")
    job = shared.train(m, trained.dataset, epochs=3, batch_size=32, lr=0.05, validation=0.2)
    final = job.wait(progress=True)
    first = capsys.readouterr().err
    # A late watcher (the same job, finished) prints the same epochs and the same end.
    job.wait(progress=True)
    again = capsys.readouterr().err
    for err in (first, again):
        assert "\r" not in err and "step/s" not in err  # no bar in a log
        lines = [line for line in err.splitlines() if not line.startswith("job ") or
                 "queued" not in line]  # fmt: skip
        epochs = [line for line in lines if line.startswith("epoch ")]
        assert len(epochs) == 3, err
        for i, line in enumerate(epochs, 1):
            assert line.startswith(f"epoch {i}/3  loss ") and "  acc " in line
            assert "val_loss" in line and "val_acc" in line
        assert lines[-1] == f"job {job.id} SUCCEEDED -> version 1", err
    assert final.state == "SUCCEEDED"


class PtyCapture:
    """A real pseudo-terminal: ``stream`` is its slave end (isatty() is True); ``text()``
    is everything written to it."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        self.master, slave = pty.openpty()
        if size is not None:
            rows, cols = size
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.stream = open(slave, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the slave end is closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def text(self) -> str:
        self.stream.close()
        self.reader.join(10)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", errors="replace")


@pytest.mark.parametrize("size", [(30, 100), None], ids=["sized", "unsized"])
def test_wait_progress_on_a_terminal(
    shared: Client, trained: Trained, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int] | None
) -> None:
    """A live tqdm bar with loss and accuracy, also on a pty nobody gave a size (where tqdm
    itself would draw nothing)."""
    tty = PtyCapture(size)
    assert tty.stream.isatty()
    m = shared.create_model(SLOW_SPEC, name=f"tty-{'sized' if size else 'unsized'}")
    monkeypatch.setattr(sys, "stderr", tty.stream)
    # A few seconds of training, so that progress events arrive while the bar is up.
    final = shared.train(m, trained.dataset, epochs=2, batch_size=8, lr=0.02).wait(progress=True)
    monkeypatch.undo()
    out = tty.text()
    assert final.state == "SUCCEEDED"
    assert "\r" in out and "epoch 1/2:" in out and "step/s" in out, out[-2000:]
    assert "loss=" in out and "acc=" in out
    assert "epoch 2/2  loss " in out and f"job {final.id} SUCCEEDED -> version 1" in out


# --- inference ------------------------------------------------------------------------------


def test_infer_batch_single_sample_and_refs(shared: Client, trained: Trained) -> None:
    x, y = trained.x, trained.y
    r = shared.infer(trained.model, x[:64])
    assert isinstance(r, InferResult) and (r.model_id, r.version) == (trained.model.id, 1)
    assert r.logits.shape == r.probabilities.shape == (64, 10) and r.classes.shape == (64,)
    assert r.logits.dtype == np.float32 and r.classes.dtype == np.int64
    np.testing.assert_allclose(r.probabilities.sum(axis=1), 1, rtol=1e-5)
    assert np.array_equal(r.classes, r.logits.argmax(axis=1))
    assert np.mean(r.classes == y[:64]) > 0.7

    one = shared.infer(trained.model.id, x[5])  # (C, H, W): one sample
    assert one.logits.shape == (1, 10)
    np.testing.assert_allclose(one.logits[0], r.logits[5], rtol=1e-5, atol=1e-6)
    by_name = shared.infer("trained", x[:64])
    np.testing.assert_allclose(by_name.logits, r.logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgument, match="input must be numbers"):
        shared.infer(trained.model, np.array([["a"]]))


def test_infer_pins_versions(shared: Client, trained: Trained) -> None:
    x = trained.x[:32]
    m = shared.create_model(SMALL_SPEC, name="versions")
    with pytest.raises(FailedPrecondition, match="no trained version"):
        shared.infer(m, x)
    first = shared.train(m, trained.dataset, epochs=1, batch_size=64, lr=0.1).wait(progress=False)
    v1 = shared.infer(m, x)
    # A second job continues from version 1 and creates version 2.
    second = shared.train(m, trained.dataset, epochs=1, batch_size=64, lr=0.1, initial_version=1,
                          seed=5).wait(progress=False)  # fmt: skip
    assert (first.result_version, second.result_version) == (1, 2)
    model = shared.get_model(m)
    assert model.latest_version == 2
    assert [(v.version, v.job_id, v.source) for v in model.versions] == [
        (1, first.id, "train"), (2, second.id, "train")]  # fmt: skip
    latest = shared.infer(m, x)
    pinned = shared.infer(m, x, version=1)
    assert (latest.version, pinned.version) == (2, 1)
    np.testing.assert_array_equal(pinned.logits, v1.logits)
    assert not np.allclose(latest.logits, v1.logits)
    with pytest.raises(NotFound, match="no version 3"):
        shared.infer(m, x, version=3)


def test_infer_stream(shared: Client, trained: Trained) -> None:
    x = trained.x
    inputs = [x[:4], x[4], np.zeros((2, 1, 9, 9), np.float32), x[5:9]]
    results = list(shared.infer_stream(trained.model, inputs))
    assert [type(r).__name__ for r in results] == [
        "InferResult", "InferResult", "InvalidArgument", "InferResult"]  # fmt: skip
    assert [r.request_id for r in results if isinstance(r, InferResult)] == ["0", "1", "3"]
    whole = shared.infer(trained.model, x[:9])
    got = np.concatenate([r.logits for r in results if isinstance(r, InferResult)])
    np.testing.assert_allclose(got, whole.logits, rtol=1e-5, atol=1e-6)
    assert "input has shape [2, 1, 9, 9]" in str(results[2])

    # Each input for a missing model is answered NotFound; the stream goes on.
    missing = list(shared.infer_stream("no-such-model", [x[0], x[1]]))
    assert [type(r) for r in missing] == [NotFound, NotFound]

    # An exception while producing the inputs reaches the caller after the results of the
    # inputs before it (not gRPC's "Exception iterating requests!").
    def inputs_then_boom() -> Iterator[np.ndarray]:
        yield x[0]
        yield x[1]
        raise RuntimeError("boom")

    it = shared.infer_stream(trained.model, inputs_then_boom())
    assert [next(it).request_id, next(it).request_id] == ["0", "1"]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    with pytest.raises(TypeError, match="model must be"):
        list(shared.infer_stream(42, [x[0]]))  # type: ignore[arg-type]


def test_inspect(shared: Client, trained: Trained, tmp_path: Path) -> None:
    x = trained.x
    ins = shared.inspect(trained.model)
    assert ins.version == 1 and ins.model.id == trained.model.id
    assert [layer.type for layer in ins.layers] == SMALL_LAYERS
    assert ins.layers[0].output_shape == (4, 8, 8) and ins.layers[0].receptive_field == (3, 3)
    assert ins.layers[2].receptive_field == (4, 4) and ins.layers[2].jump == (2, 2)
    assert ins.layers[3].receptive_field == ()  # flat: the whole input
    assert sum(layer.parameters for layer in ins.layers) == trained.model.parameter_count
    assert {p.name for p in ins.parameters} == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert all(p.std >= 0 and p.min <= p.mean <= p.max for p in ins.parameters)
    assert [e.epoch for e in ins.history[1]] == [1, 2, 3]
    assert ins.weights == {} and ins.feature_maps == {}
    assert ins.saliency is None and ins.logits is None and ins.target_class is None

    weights = shared.inspect("trained", include_weights=True).weights
    with np.load(shared.export_model(trained.model, tmp_path / "m.npz")) as exported:
        assert set(weights) == {k for k in exported.files if k != "__spec__"}
        for name, w in weights.items():
            np.testing.assert_array_equal(w, exported[name])

    with_input = shared.inspect(trained.model, input=x[0])
    expected = shared.infer(trained.model, x[:1])
    assert list(with_input.feature_maps) == [f"{i}.{t}" for i, t in enumerate(SMALL_LAYERS)]
    assert with_input.feature_maps["0.conv2d"].shape == (1, 4, 8, 8)
    assert with_input.feature_maps["4.linear"].shape == (1, 10)
    assert with_input.logits is not None and with_input.saliency is not None
    np.testing.assert_allclose(with_input.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert with_input.target_class == int(expected.classes[0])
    assert with_input.saliency.shape == (1, 1, 8, 8) and np.abs(with_input.saliency).max() > 0
    batch_of_one = shared.inspect(trained.model, input=x[:1])
    np.testing.assert_array_equal(batch_of_one.saliency, with_input.saliency)

    other = (with_input.target_class + 1) % 10
    targeted = shared.inspect(trained.model, input=x[0], target_class=other)
    assert targeted.target_class == other
    assert not np.allclose(targeted.saliency, with_input.saliency)
    with pytest.raises(InvalidArgument) as e:
        shared.inspect(trained.model, input=x[0], target_class=10)
    assert "target_class" in e.value.fields
    with pytest.raises(InvalidArgument) as e:
        shared.inspect(trained.model, input=x[:2])
    assert "input.shape" in e.value.fields


def test_export_import_round_trip(shared: Client, trained: Trained, tmp_path: Path) -> None:
    path = shared.export_model(trained.model, tmp_path / "m.npz")
    assert path == tmp_path / "m.npz"
    with np.load(path) as z:
        assert set(z.files) == {"0.weight", "0.bias", "4.weight", "4.bias", "__spec__"}
        assert z["0.weight"].shape == (4, 1, 3, 3) and z["4.weight"].shape == (10, 64)
        assert json.loads(str(z["__spec__"]))["input_shape"] == [1, 8, 8]
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind

    imported = shared.import_model(path, name="imported")
    assert imported.id != trained.model.id and imported.latest_version == 1
    assert imported.versions[0].source == "import"
    assert imported.parameter_count == trained.model.parameter_count
    x = trained.x[:32]
    np.testing.assert_array_equal(shared.infer(imported, x).logits,
                                  shared.infer(trained.model, x).logits)  # fmt: skip
    with pytest.raises(AlreadyExists):
        shared.import_model(path, name="imported")

    # An untrained model exports its initial weights; a missing one writes nothing.
    fresh = shared.create_model(SMALL_SPEC, name="untrained", seed=9)
    with np.load(shared.export_model(fresh, tmp_path / "fresh.npz")) as z:
        assert not np.array_equal(z["0.weight"], np.load(path)["0.weight"])
    with pytest.raises(NotFound):
        shared.export_model("no-such-model", tmp_path / "missing.npz")
    assert not (tmp_path / "missing.npz").exists()
    with pytest.raises(InvalidArgument, match="not a cnnd model archive"):
        (tmp_path / "junk.npz").write_bytes(b"not a zip")
        shared.import_model(tmp_path / "junk.npz", name="junk")


@pytest.mark.parametrize("cause", ["lr", "inputs"])
def test_failed_job(shared: Client, trained: Trained, cause: str) -> None:
    """A job that diverges FAILS on a non-finite loss and adds no version: SGD with lr=1e6 on
    a network without nonlinearity (with ReLUs, lr=1e6 only kills them and the loss stays
    finite), or finite inputs so large that the logits overflow."""
    m = shared.create_model(LINEAR_SPEC if cause == "lr" else SMALL_SPEC, name=f"diverge-{cause}")
    if cause == "lr":
        job = shared.train(m, trained.dataset, epochs=2, batch_size=32, lr=1e6)
    else:
        huge = shared.upload_dataset(trained.x * 3e37, trained.y, name="huge")
        job = shared.train(m, huge, epochs=2, batch_size=64, lr=0.1)
    with pytest.raises(JobFailed, match="FAILED: non-finite loss"):
        job.wait(progress=False, raise_on_failure=True)
    final = job.refresh()
    assert final.state == "FAILED" and "non-finite loss" in final.failure_reason
    assert final.result_version == 0 and shared.get_model(m).latest_version == 0
    assert job.wait(progress=False).state == "FAILED"  # no raise by default


# --- health ---------------------------------------------------------------------------------


def test_health_and_wait_until_ready(shared: Client) -> None:
    assert shared.health() == "SERVING"
    _, seconds = timed(lambda: shared.wait_until_ready(5))
    assert seconds < 1


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model_is_not_found(shared: Client, trained: Trained, tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: shared.get_model("no-such-model"),
        lambda: shared.delete_model("no-such-model"),
        lambda: shared.infer("no-such-model", trained.x[:1]),
        lambda: shared.inspect("no-such-model"),
        lambda: shared.export_model("no-such-model", tmp_path / "x.npz"),
        lambda: shared.train("no-such-model", trained.dataset),
        lambda: shared.list_jobs(model="no-such-model"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as e:
            call()
        assert e.value.code == "NOT_FOUND" and "no-such-model" in e.value.message
        assert e.value.fields == {"model_id": e.value.message}
        assert str(e.value).startswith("NOT_FOUND: ")
    with pytest.raises(NotFound):
        shared.train(trained.model, "no-such-dataset")
    with pytest.raises(NotFound):
        shared.get_job(MISSING_JOB)


def test_invalid_arguments_carry_field_violations(shared: Client, trained: Trained) -> None:
    with pytest.raises(InvalidArgument) as e:
        shared.infer(trained.model, np.zeros((2, 1, 9, 9), np.float32))
    assert e.value.code == "INVALID_ARGUMENT"
    assert e.value.fields == {"input.shape": e.value.message}
    assert "expects [N, 1, 8, 8]" in e.value.message

    too_big = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 30}, {"type": "flatten"},
        {"type": "linear", "out_features": 3}]}  # fmt: skip
    with pytest.raises(InvalidArgument) as e:
        shared.create_model(too_big, name="too-big")
    assert list(e.value.fields) == ["spec.layers[0].kernel_size"]
    with pytest.raises(InvalidArgument) as e:
        shared.train(trained.model, trained.dataset, epochs=0)
    assert list(e.value.fields) == ["epochs"]
    with pytest.raises(InvalidArgument) as e:
        shared.create_model(SMALL_SPEC, name="bad name!")
    assert list(e.value.fields) == ["name"]
    # Found before anything is sent: still an InvalidArgument, not a protobuf error.
    with pytest.raises(InvalidArgument, match="spec"):
        shared.create_model({"input_shape": [1, 8, 8], "layers": [{"type": "conv9d"}]}, name="q")
    with pytest.raises(InvalidArgument, match="spec"):
        bad_type = {"input_shape": [1, 8, 8], "layers": [{"type": "conv2d", "out_channels": "4"}]}
        shared.create_model(bad_type, name="q")


def test_server_down_is_unavailable_after_retries() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(target, retries=4, timeout=10) as c:
        error, seconds = timed(c.list_models)
    assert isinstance(error, Unavailable) and error.code == "UNAVAILABLE", error
    assert "Connection refused" in error.message or "failed to connect" in error.message
    assert seconds < 8, f"gave up after {seconds:.1f} s"
    with Client(target, retries=0, timeout=10) as c:
        error, seconds = timed(c.list_models)
    assert isinstance(error, Unavailable) and seconds < 1
    with Client(target, timeout=10) as c:
        error, seconds = timed(lambda: c.wait_until_ready(1))
    assert isinstance(error, Unavailable) and "not SERVING after 1 s" in str(error)
    assert seconds < 2


def test_no_grpc_error_escapes(shared: Client, trained: Trained, tmp_path: Path) -> None:
    """Every call against a server that is down, and streams of missing things on a live
    one, raise CnndError subclasses; grpc.RpcError never reaches the caller."""
    x, y = trained.x[:8], trained.y[:8]
    exported = shared.export_model(trained.model, tmp_path / "m.npz")
    job = shared.list_jobs()[0]
    gone = dataclasses.replace(job, id=MISSING_JOB)  # a Job object for a job that is not there
    with pytest.raises(NotFound):
        list(gone.events())
    with pytest.raises(NotFound):
        gone.wait(progress=False)
    with pytest.raises(NotFound):
        list(shared.watch_job(MISSING_JOB))

    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=1) as down:
        bound = dataclasses.replace(job, _client=down)
        calls: dict[str, Callable[[], object]] = {
            "health": down.health,
            "create_model": lambda: down.create_model(SMALL_SPEC, name="m"),
            "get_model": lambda: down.get_model("m"),
            "list_models": down.list_models,
            "delete_model": lambda: down.delete_model("m"),
            "export_model": lambda: down.export_model("m", tmp_path / "x.npz"),
            "import_model": lambda: down.import_model(exported, name="m"),
            "upload_dataset": lambda: down.upload_dataset(x, y, name="d", num_classes=10),
            "get_dataset": lambda: down.get_dataset("d"),
            "list_datasets": down.list_datasets,
            "delete_dataset": lambda: down.delete_dataset("d"),
            "train": lambda: down.train("m", "d"),
            "get_job": lambda: down.get_job(MISSING_JOB),
            "list_jobs": down.list_jobs,
            "cancel_job": lambda: down.cancel_job(MISSING_JOB),
            "watch_job": lambda: list(down.watch_job(MISSING_JOB)),
            "Job.events": lambda: list(bound.events()),
            "Job.refresh": bound.refresh,
            "Job.cancel": bound.cancel,
            "Job.wait": lambda: bound.wait(progress=False),
            "infer": lambda: down.infer("m", x),
            "infer_stream": lambda: list(down.infer_stream("m", [x])),
            "inspect": lambda: down.inspect("m", input=x[0]),
        }
        for name, call in calls.items():
            error, seconds = timed(call)
            assert isinstance(error, Unavailable), f"{name} raised {error!r}"
            assert not isinstance(error, grpc.RpcError)
            assert seconds < 5, f"{name} took {seconds:.1f} s"


# --- retries and deadlines ------------------------------------------------------------------


def test_idempotent_calls_are_retried_on_unavailable(
    scripted: Callable[..., tuple[str, Script]],
) -> None:
    target, script = scripted(ListModels=2, GetModel=4, CreateModel=1)
    with Client(target, retries=4, timeout=10) as c:
        assert [m.name for m in c.list_models()] == ["m"]
        assert script.calls["ListModels"] == 3  # two failures, then the answer
        assert c.get_model("m").id == "mdl_1"
        assert script.calls["GetModel"] == 5  # the whole budget: 1 + 4 retries
        # CreateModel changes something: never retried, even though the next try would work.
        with pytest.raises(Unavailable, match="CreateModel attempt 1"):
            c.create_model(SMALL_SPEC, name="n")
        assert script.calls["CreateModel"] == 1
        assert c.create_model(SMALL_SPEC, name="n").id == "mdl_2"  # the caller's own retry

    target, script = scripted(ListModels=3)  # more failures than a budget of 1 + 2 retries
    with Client(target, retries=2, timeout=10) as c, pytest.raises(Unavailable, match="attempt 3"):
        c.list_models()
    assert script.calls["ListModels"] == 3

    target, script = scripted(ListModels=1)
    with Client(target, retries=0, timeout=10) as c, pytest.raises(Unavailable, match="attempt 1"):
        c.list_models()
    assert script.calls["ListModels"] == 1


def test_default_deadline_on_a_server_that_never_answers(silent_tcp: str) -> None:
    """A TCP peer that accepts and never speaks HTTP/2: every unary call ends at its deadline
    (the client's ``timeout``), and wait_until_ready at its own."""
    with Client(silent_tcp, timeout=1) as c:
        for call in (c.list_models, c.health, lambda: c.create_model(SMALL_SPEC, name="m")):
            error, seconds = timed(call)
            assert isinstance(error, DeadlineExceeded | Unavailable), error
            assert 0.9 <= seconds < 3, f"{seconds:.1f} s"
        # Streams have no default deadline (a job can train for hours), but take one.
        error, seconds = timed(lambda: list(c.watch_job(MISSING_JOB, timeout=1)))
        assert isinstance(error, DeadlineExceeded | Unavailable) and seconds < 3, error
    with Client(silent_tcp, timeout=60) as c:
        error, seconds = timed(lambda: c.wait_until_ready(1))
        assert isinstance(error, Unavailable) and seconds < 3, (error, seconds)


def test_errors_are_cnnd_errors() -> None:
    for cls in (NotFound, InvalidArgument, Unavailable, DeadlineExceeded, JobFailed):
        assert issubclass(cls, CnndError) and not issubclass(cls, grpc.RpcError)
