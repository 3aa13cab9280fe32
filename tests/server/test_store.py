"""One suite for the Store contract (server/store/base.py), run against both implementations:
the embedded SQLiteStore and the scale-out PostgresStore (on a real PostgreSQL, a fresh
database per test). Tests at the end cover what only PostgreSQL has: migrations applied by
replicas starting together, LISTEN/NOTIFY of new versions, readiness when the database goes
away, and the lease history."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnd.server.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from cnnd.server.store.base import (
    CANCELLED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    BatchingPolicy,
    DatasetRecord,
    JobRecord,
    LeaseLost,
    ModelRecord,
    Store,
    now,
)
from cnnd.server.store.sqlite import SQLiteStore

pytest_plugins = ["tests.pg"]

BIG = 2 * (1 << 20) + 12345  # crosses PostgreSQL's 1 MiB chunks twice, unaligned


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Store]]:
    """Opens stores on one backing database (several PostgresStores act as replicas)."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if backend == "postgres" else ""

    def make() -> Store:
        if backend == "sqlite":
            s: Store = SQLiteStore(tmp_path / "data")
        else:
            from cnnd.server.store.postgres import PostgresStore

            s = PostgresStore(url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    return open_store()


# --- helpers ----------------------------------------------------------------------------
def make_model(store: Store, name: str = "m") -> ModelRecord:
    record = ModelRecord(
        id=f"mdl_{uuid.uuid4().hex[:12]}", name=name, spec={"input_shape": [1, 2, 2], "n": 1},
        seed=7, parameter_count=42, create_time=now(),
    )  # fmt: skip
    return store.create_model(record)


def dataset_arrays(n: int = 6, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    x = (rng.random((n, 1, 4, 4)) * 255).astype(dtype)
    return x, (np.arange(n) % 3).astype("<i4")


def _record(name: str, x: np.ndarray, y: np.ndarray) -> DatasetRecord:
    raw = x.tobytes() + y.tobytes()
    return DatasetRecord(
        id=f"ds_{uuid.uuid4().hex[:12]}", name=name, sample_shape=tuple(x.shape[1:]),
        dtype=str(x.dtype), num_classes=3, sample_count=len(x), size_bytes=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(), create_time=now(),
    )  # fmt: skip


def _write_in_pieces(write: Callable[[bytes], None], data: bytes, pieces: int = 3) -> None:
    step = max(1, len(data) // pieces + 1)
    for lo in range(0, len(data), step):
        write(data[lo : lo + step])


def make_dataset(
    store: Store, name: str = "d", n: int = 6, dtype: str = "float32"
) -> DatasetRecord:
    x, y = dataset_arrays(n, dtype)
    with store.dataset_writer(1 << 30) as w:
        _write_in_pieces(w.write_images, x.tobytes())
        _write_in_pieces(w.write_labels, y.tobytes())
        return w.commit(_record(name, x, y))


def make_job(
    store: Store, model: ModelRecord, data: DatasetRecord, max_queued: int = 100, **config: Any
) -> JobRecord:
    record = JobRecord(
        id=f"job_{uuid.uuid4().hex[:12]}", model_id=model.id, dataset_id=data.id, state=QUEUED,
        config={"dataset_id": data.id, "validation_dataset_id": "", **config}, create_time=now(),
    )  # fmt: skip
    return store.create_job(record, max_queued)


@pytest.fixture
def md(store: Store) -> tuple[ModelRecord, DatasetRecord]:
    return make_model(store), make_dataset(store)


def get(store: Store, job_id: str) -> JobRecord:
    job = store.get_job(job_id)
    assert job is not None
    return job


def is_postgres(store: Store) -> bool:
    return type(store).__name__ == "PostgresStore"


# --- models and versions ----------------------------------------------------------------
def test_models_create_get_list_page_delete(store: Store) -> None:
    _, b, c = (make_model(store, n) for n in "abc")
    for key in (b.id, "b"):
        got = store.get_model(key)
        assert got is not None and (got.id, got.name, got.seed) == (b.id, "b", 7)
        assert got.spec == b.spec and got.parameter_count == 42 and got.versions == []
    assert store.get_model("nope") is None
    with pytest.raises(AlreadyExists):
        make_model(store, "a")
    assert [m.name for m in store.list_models(2)] == ["a", "b"]
    assert [m.name for m in store.list_models(2, after=b.id)] == ["c"]
    assert store.list_models(5, after=c.id) == []
    store.delete_model(b.id)
    assert store.get_model(b.id) is None
    assert [m.name for m in store.list_models(10)] == ["a", "c"]
    with pytest.raises(NotFound):
        store.delete_model(b.id)
    make_model(store, "b")  # the name is free again
    assert [m.name for m in store.list_models(10)] == ["a", "c", "b"]


def test_versions_are_numbered_and_keep_their_weights(store: Store) -> None:
    m = make_model(store)
    big = np.random.default_rng(1).bytes(BIG)
    v1 = store.add_version(m.id, b"small", "job_1", "train", [{"epoch": 1, "loss": 0.5}])
    v2 = store.add_version(m.id, big, "", "import", [])
    assert (v1.version, v2.version) == (1, 2)
    got = store.get_model("m")
    assert got is not None and got.latest_version == 2
    assert [(v.version, v.job_id, v.source) for v in got.versions] == [
        (1, "job_1", "train"),
        (2, "", "import"),
    ]
    assert got.versions[0].history == [{"epoch": 1, "loss": 0.5}]
    assert store.get_weights(m.id, 1) == b"small"
    assert store.get_weights(m.id, 2) == big
    with pytest.raises(NotFound):
        store.get_weights(m.id, 3)
    with pytest.raises(NotFound):
        store.add_version("mdl_missing", b"x", "", "import", [])
    assert [m.latest_version for m in store.list_models(10)] == [2]


def test_a_version_is_never_visible_before_its_weights(open_store: Callable[[], Store]) -> None:
    writer, reader = open_store(), None
    reader = writer if not hasattr(writer, "url") else open_store()  # another replica
    m = make_model(writer)
    weights = np.random.default_rng(2).bytes(16 * (1 << 20))
    seen: list[bytes] = []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            rec = reader.get_model(m.id)
            if rec is not None and rec.latest_version:
                seen.append(reader.get_weights(m.id, 1))

    t = threading.Thread(target=watch)
    t.start()
    writer.add_version(m.id, weights, "", "import", [])
    t.join()
    assert seen and seen[0] == weights


def test_delete_model_is_refused_while_a_job_is_active(
    store: Store, md: tuple[ModelRecord, DatasetRecord]
) -> None:
    m, d = md
    store.add_version(m.id, b"w", "", "import", [])
    job = make_job(store, m, d)
    with pytest.raises(FailedPrecondition):
        store.delete_model(m.id)  # QUEUED
    assert store.claim_job("w1", 30) is not None
    with pytest.raises(FailedPrecondition):
        store.delete_model(m.id)  # RUNNING
    store.finish_job(job.id, "w1", SUCCEEDED)
    store.delete_model(m.id)
    assert store.get_model(m.id) is None
    with pytest.raises(NotFound):
        store.get_weights(m.id, 1)
    assert store.stats()["versions"] == 0


def test_batching_policies_are_kept_and_updated_field_by_field(
    open_store: Callable[[], Store],
) -> None:
    store = open_store()
    other = open_store() if is_postgres(store) else store  # another replica reads
    plain = make_model(store, "plain")
    assert plain.batching == BatchingPolicy()
    tuned = ModelRecord(
        id="mdl_tuned", name="tuned", spec={"input_shape": [1, 2, 2]}, seed=1,
        parameter_count=3, create_time=now(), batching=BatchingPolicy(8, None, False),
    )  # fmt: skip
    store.create_model(tuned)
    store.add_version(tuned.id, b"w", "", "import", [])
    assert other.get_model("tuned").batching == BatchingPolicy(8, None, False)  # type: ignore[union-attr]

    # Only the named fields change; the record comes back whole.
    updated = store.update_model_batching(tuned.id, BatchingPolicy(99, 250), ["max_queue_delay_us"])
    assert updated.batching == BatchingPolicy(8, 250, False)
    assert (updated.id, updated.name, updated.latest_version) == (tuned.id, "tuned", 1)
    # A named field that is None returns to the server's default.
    store.update_model_batching(tuned.id, BatchingPolicy(), ["max_batch_size", "disabled"])
    assert other.get_model(tuned.id).batching == BatchingPolicy(max_queue_delay_us=250)  # type: ignore[union-attr]
    assert {m.name: m.batching for m in other.list_models(10)} == {
        "plain": BatchingPolicy(),
        "tuned": BatchingPolicy(max_queue_delay_us=250),
    }
    with pytest.raises(NotFound):
        store.update_model_batching("mdl_missing", BatchingPolicy(1), ["max_batch_size"])


def test_concurrent_updates_of_different_fields_both_hold(
    open_store: Callable[[], Store], backend: str
) -> None:
    first = open_store()
    stores = [first, open_store()] if backend == "postgres" else [first]
    m = make_model(first)
    fields = ["max_batch_size", "max_queue_delay_us"]
    step = threading.Barrier(len(fields), timeout=30)  # a failing thread cannot hang the other
    lost: list[BatchingPolicy] = []
    errors: list[BaseException] = []

    def update(i: int) -> None:
        try:
            for value in range(1, 31):  # each round, both fields are written at the same moment
                step.wait()
                stores[i % len(stores)].update_model_batching(
                    m.id, BatchingPolicy(**{fields[i]: value}), [fields[i]]
                )
                step.wait()
                got = first.get_model(m.id).batching  # type: ignore[union-attr]
                if i == 0 and got != BatchingPolicy(value, value):
                    lost.append(got)  # a read-merge-write outside one transaction loses writes
        except BaseException as e:  # surfaced below; the other thread is released
            step.abort()
            errors.append(e)

    threads = [threading.Thread(target=update, args=(i,), daemon=True) for i in range(len(fields))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [e for e in errors if not isinstance(e, threading.BrokenBarrierError)] == []
    assert errors == []
    assert lost == []
    assert first.get_model(m.id).batching == BatchingPolicy(30, 30)  # type: ignore[union-attr]


def test_a_database_of_the_first_schema_upgrades(
    open_store: Callable[[], Store], backend: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """A database made before per-model batching policies gains them at start-up: its models
    keep everything and take the server's defaults until updated."""
    import cnnd.server.store.postgres as pg_module
    import cnnd.server.store.sqlite as sqlite_module

    module: Any = pg_module if backend == "postgres" else sqlite_module
    monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
    open_store().close()  # creates the schema of the first version
    row = "'mdl_old', 'old', '{\"input_shape\": [1, 2, 2]}', 7, 42, 1.5"
    if backend == "postgres":
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_url")) as conn:
            conn.execute(
                "INSERT INTO models (id, name, spec, seed, parameter_count, create_time)"
                f" VALUES ({row})"  # type: ignore[arg-type]  (test-owned SQL)
            )
    else:
        import sqlite3

        db = sqlite3.connect(tmp_path / "data" / "cnnd.db")
        db.execute(f"INSERT INTO models (id, name, spec, seed, parameter_count, create_time, seq)"
                   f" VALUES ({row}, 1)")  # fmt: skip
        db.commit()
        db.close()
    monkeypatch.undo()
    store = open_store()
    old = store.get_model("old")
    assert old is not None and old.batching == BatchingPolicy()
    assert (old.id, old.spec, old.seed, old.parameter_count) == (
        "mdl_old", {"input_shape": [1, 2, 2]}, 7, 42)  # fmt: skip
    store.update_model_batching(old.id, BatchingPolicy(4), ["max_batch_size"])
    assert store.get_model("old").batching == BatchingPolicy(4)  # type: ignore[union-attr]
    make_model(store, "new")  # and new models go in beside it
    assert [m.name for m in store.list_models(10)] == ["old", "new"]


# --- datasets ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_dataset_upload_commit_and_load(store: Store, dtype: str) -> None:
    n = BIG // 64 + 3  # images span several chunks
    x, y = dataset_arrays(n, dtype)
    with store.dataset_writer(1 << 30) as w:
        _write_in_pieces(w.write_images, x.tobytes(), pieces=7)
        _write_in_pieces(w.write_labels, y.tobytes(), pieces=2)
        images, labels = w.arrays()
        assert images.tobytes() == x.tobytes() and labels.tobytes() == y.tobytes()
        assert store.get_dataset("d") is None and store.list_datasets(10) == []
        record = w.commit(_record("d", x, y))
    for key in (record.id, "d"):
        got = store.get_dataset(key)
        assert got == record
    gx, gy = store.load_dataset(record.id)
    assert gx.shape == x.shape and gx.dtype == np.dtype(dtype)
    assert gy.shape == (n,) and gy.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    assert not gx.flags.writeable and not gy.flags.writeable
    with pytest.raises(NotFound):
        store.load_dataset("ds_missing")


def test_dataset_upload_abort_leaves_nothing(store: Store) -> None:
    x, _ = dataset_arrays(BIG // 64)
    before = store.stats()["bytes"]
    with store.dataset_writer(1 << 30) as w:  # leaving without commit aborts
        w.write_images(x.tobytes())
        assert store.stats()["bytes"] == before  # nothing is visible while it streams
    with pytest.raises(RuntimeError), store.dataset_writer(1 << 30) as w:
        w.write_images(x.tobytes())
        raise RuntimeError("the client went away")
    with store.dataset_writer(1 << 30) as w:
        w.write_images(x.tobytes())
        w.abort()
    assert store.list_datasets(10) == [] and store.stats()["datasets"] == 0
    assert store.stats()["bytes"] == before
    make_dataset(store, "after")  # the store still works
    assert [d.name for d in store.list_datasets(10)] == ["after"]


def test_dataset_upload_size_limit(store: Store) -> None:
    with store.dataset_writer(100) as w:
        w.write_images(b"\0" * 60)
        with pytest.raises(ResourceExhausted):
            w.write_labels(b"\0" * 41)
    assert store.list_datasets(10) == []


def test_dataset_duplicate_name(store: Store) -> None:
    first = make_dataset(store, "d")
    with pytest.raises(AlreadyExists):
        make_dataset(store, "d", n=9)
    assert [d.id for d in store.list_datasets(10)] == [first.id]
    x, _ = store.load_dataset(first.id)
    assert len(x) == 6


def test_dataset_list_paging_and_delete(store: Store) -> None:
    m = make_model(store)
    a, b, _ = (make_dataset(store, n) for n in "abc")
    assert [d.name for d in store.list_datasets(2)] == ["a", "b"]
    assert [d.name for d in store.list_datasets(2, after=b.id)] == ["c"]
    job = make_job(store, m, a, validation_dataset_id=b.id)
    for used in (a, b):  # as training and as validation data
        with pytest.raises(FailedPrecondition):
            store.delete_dataset(used.id)
    store.cancel_job(job.id)
    store.delete_dataset(b.id)
    assert [d.name for d in store.list_datasets(10)] == ["a", "c"]
    with pytest.raises(NotFound):
        store.load_dataset(b.id)
    with pytest.raises(NotFound):
        store.delete_dataset(b.id)


# --- jobs -------------------------------------------------------------------------------
def test_create_job_queue_limit(store: Store, md: tuple[ModelRecord, DatasetRecord]) -> None:
    m, d = md
    make_job(store, m, d, max_queued=2)
    make_job(store, m, d, max_queued=2)
    with pytest.raises(ResourceExhausted):
        make_job(store, m, d, max_queued=2)
    store.claim_job("w", 30)  # a RUNNING job no longer counts
    make_job(store, m, d, max_queued=2)
    assert store.stats()["jobs_QUEUED"] == 2


def test_claims_take_the_oldest_job_and_queue_positions_follow(
    store: Store, md: tuple[ModelRecord, DatasetRecord]
) -> None:
    m, d = md
    jobs = [make_job(store, m, d, n=i) for i in range(3)]
    assert [j.seq for j in jobs] == sorted(j.seq for j in jobs)
    assert [store.queue_position(j.id) for j in jobs] == [1, 2, 3]
    assert get(store, jobs[0].id).config["n"] == 0
    claimed = store.claim_job("w1", 30)
    assert claimed is not None and claimed.id == jobs[0].id
    assert (claimed.state, claimed.attempts, claimed.lease_owner) == (RUNNING, 1, "w1")
    assert claimed.lease_expires > now() + 20 and claimed.start_time is not None
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    assert store.claim_job("w2", 30).id == jobs[1].id  # type: ignore[union-attr]
    assert store.claim_job("w3", 30).id == jobs[2].id  # type: ignore[union-attr]
    assert store.claim_job("w4", 30) is None


def test_progress_and_finish_are_recorded(
    store: Store, md: tuple[ModelRecord, DatasetRecord]
) -> None:
    m, d = md
    job = make_job(store, m, d)
    store.claim_job("w", 30)
    progress = {"epoch": 2, "step": 5, "loss": 0.25, "accuracy": None}
    history = [{"epoch": 1, "loss": 0.5, "val_loss": None}]
    store.update_progress(job.id, "w", progress, history)
    got = get(store, job.id)
    assert (got.progress, got.history) == (progress, history)
    done = store.finish_job(job.id, "w", SUCCEEDED, result_version=3, history=history * 2)
    assert (done.state, done.result_version, done.history) == (SUCCEEDED, 3, history * 2)
    assert done.lease_owner == "" and done.end_time is not None
    assert get(store, job.id) == done
    with pytest.raises(LeaseLost):  # a finished job has no lease to hold
        store.update_progress(job.id, "w", progress, history)


def test_list_jobs_filters_and_pages(store: Store) -> None:
    m1, m2, d = make_model(store, "m1"), make_model(store, "m2"), make_dataset(store)
    jobs = [make_job(store, m, d) for m in (m1, m2, m1, m2)]
    store.claim_job("w", 30)
    assert [j.id for j in store.list_jobs(10)] == [j.id for j in jobs]
    assert [j.id for j in store.list_jobs(10, model_id=m1.id)] == [jobs[0].id, jobs[2].id]
    assert [j.id for j in store.list_jobs(10, state=RUNNING)] == [jobs[0].id]
    assert [j.id for j in store.list_jobs(10, model_id=m2.id, state=QUEUED)] == [
        jobs[1].id,
        jobs[3].id,
    ]
    page = store.list_jobs(2)
    assert [j.id for j in store.list_jobs(2, after=page[-1].id)] == [jobs[2].id, jobs[3].id]
    assert store.get_job("job_missing") is None


def test_an_expired_lease_is_claimed_again_and_the_old_owner_is_fenced(
    store: Store, md: tuple[ModelRecord, DatasetRecord]
) -> None:
    m, d = md
    job = make_job(store, m, d)
    assert store.claim_job("old", 0.3) is not None
    assert store.claim_job("new", 30) is None  # the lease still holds
    time.sleep(0.5)
    taken = store.claim_job("new", 30)
    assert taken is not None and taken.id == job.id
    assert (taken.attempts, taken.lease_owner, taken.state) == (2, "new", RUNNING)
    assert not store.renew_lease(job.id, "old", 30)
    with pytest.raises(LeaseLost):
        store.update_progress(job.id, "old", {"epoch": 9}, [])
    with pytest.raises(LeaseLost):
        store.put_checkpoint(job.id, "old", b"stale")
    with pytest.raises(LeaseLost):
        store.finish_job(job.id, "old", SUCCEEDED)
    store.release_job(job.id, "old")  # a no-op for a non-holder
    got = get(store, job.id)
    assert (got.state, got.lease_owner, got.progress) == (RUNNING, "new", {})
    assert store.get_checkpoint(job.id) is None
    assert store.renew_lease(job.id, "new", 30)
    store.update_progress(job.id, "new", {"epoch": 1}, [])
    assert store.finish_job(job.id, "new", SUCCEEDED).state == SUCCEEDED


def test_renewing_keeps_the_lease(store: Store, md: tuple[ModelRecord, DatasetRecord]) -> None:
    m, d = md
    job = make_job(store, m, d)
    first = store.claim_job("w1", 0.6)
    assert first is not None
    for _ in range(4):  # 0.8 s in all: past the first expiry
        time.sleep(0.2)
        assert store.renew_lease(job.id, "w1", 0.6)
    assert store.claim_job("w2", 30) is None
    assert get(store, job.id).lease_expires > first.lease_expires + 0.5
    time.sleep(0.8)
    assert store.claim_job("w2", 30) is not None  # once renewals stop, it expires


def test_cancel(store: Store, md: tuple[ModelRecord, DatasetRecord]) -> None:
    m, d = md
    running, queued = make_job(store, m, d), make_job(store, m, d)
    store.claim_job("w", 30)
    got = store.cancel_job(queued.id)
    assert (got.state, got.cancel_requested) == (CANCELLED, True) and got.end_time is not None
    assert store.queue_position(queued.id) == 0
    got = store.cancel_job(running.id)
    assert (got.state, got.cancel_requested, got.lease_owner) == (RUNNING, True, "w")
    assert store.finish_job(running.id, "w", CANCELLED, "by request").state == CANCELLED
    assert store.claim_job("w2", 30) is None  # a cancelled job never runs
    with pytest.raises(FailedPrecondition):
        store.cancel_job(queued.id)
    with pytest.raises(NotFound):
        store.cancel_job("job_missing")


def test_release_puts_a_job_back_in_its_place(
    store: Store, md: tuple[ModelRecord, DatasetRecord]
) -> None:
    m, d = md
    first, second = make_job(store, m, d), make_job(store, m, d)
    store.claim_job("w1", 30)
    store.release_job(first.id, "w1")
    got = get(store, first.id)
    assert (got.state, got.lease_owner) == (QUEUED, "")
    assert store.queue_position(first.id) == 1 and store.queue_position(second.id) == 2
    again = store.claim_job("w2", 30)
    assert again is not None and again.id == first.id and again.attempts == 2


def test_recover(store: Store, md: tuple[ModelRecord, DatasetRecord]) -> None:
    """SQLite (one node) takes back every RUNNING job at start-up; PostgreSQL must not, since
    the job may run on a live replica: it waits for the lease to expire."""
    m, d = md
    job = make_job(store, m, d)
    store.claim_job("dead", 30)
    if is_postgres(store):
        assert store.recover() == []
        assert store.claim_job("w", 30) is None
        assert get(store, job.id).lease_owner == "dead"
    else:
        assert store.recover() == [job.id]
        taken = store.claim_job("w", 30)
        assert taken is not None and taken.id == job.id and taken.attempts == 2


# --- checkpoints ------------------------------------------------------------------------
def test_checkpoints(store: Store, md: tuple[ModelRecord, DatasetRecord]) -> None:
    m, d = md
    job = make_job(store, m, d)
    assert store.get_checkpoint(job.id) is None
    with pytest.raises(LeaseLost):
        store.put_checkpoint(job.id, "w", b"not claimed yet")
    store.claim_job("w", 30)
    big = np.random.default_rng(3).bytes(BIG)
    store.put_checkpoint(job.id, "w", big)
    assert store.get_checkpoint(job.id) == big
    store.put_checkpoint(job.id, "w", b"second")  # replaces
    assert store.get_checkpoint(job.id) == b"second"
    store.delete_checkpoint(job.id)
    assert store.get_checkpoint(job.id) is None
    store.delete_checkpoint(job.id)  # deleting nothing is fine


# --- misc -------------------------------------------------------------------------------
def test_stats(store: Store) -> None:
    empty = store.stats()
    assert (empty["models"], empty["versions"], empty["datasets"]) == (0, 0, 0)
    m, d = make_model(store), make_dataset(store)
    store.add_version(m.id, b"w" * BIG, "", "import", [])
    jobs = [make_job(store, m, d) for _ in range(3)]
    store.claim_job("w", 30)
    store.cancel_job(jobs[2].id)
    s = store.stats()
    assert (s["models"], s["versions"], s["datasets"]) == (1, 1, 1)
    assert (s["jobs_RUNNING"], s["jobs_QUEUED"], s["jobs_CANCELLED"]) == (1, 1, 1)
    assert s["bytes"] >= empty["bytes"] + BIG + d.size_bytes


def test_ping_and_watch_versions(open_store: Callable[[], Store]) -> None:
    store = open_store()
    assert store.ping()
    if not is_postgres(store):
        assert list(store.watch_versions()) == []
        return
    other = open_store()  # another replica commits versions
    m = make_model(other)
    got: list[tuple[str, int]] = []
    stream = store.watch_versions()
    t = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
    t.start()
    # The listener connects in the background: commit versions until it has heard one.
    added = []
    while t.is_alive() and len(added) < 50:
        added.append(other.add_version(m.id, b"w", "", "import", []).version)
        t.join(0.2)
    assert got and got[0][0] == m.id and got[0][1] in added
    stream.close()


def test_concurrent_claims_never_take_a_job_twice(
    open_store: Callable[[], Store], backend: str
) -> None:
    first = open_store()
    # PostgreSQL: two stores, as two replicas with their own pools; SQLite: one process.
    stores = [first, open_store()] if backend == "postgres" else [first]
    m, d = make_model(first), make_dataset(first)
    jobs = {make_job(first, m, d).id for _ in range(24)}
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        s = stores[i % len(stores)]
        start.wait()
        while (job := s.claim_job(f"w{i}", 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(jobs)  # every job once, none twice
    assert all(j.attempts == 1 for j in first.list_jobs(100))


def test_concurrent_submissions_respect_the_queue_limit(
    open_store: Callable[[], Store], backend: str
) -> None:
    first = open_store()
    stores = [first, open_store()] if backend == "postgres" else [first]
    m, d = make_model(first), make_dataset(first)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def submit(i: int) -> None:
        start.wait()
        try:
            make_job(stores[i % len(stores)], m, d, max_queued=5)
            outcomes.append("ok")
        except ResourceExhausted:
            outcomes.append("full")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["full"] * 3 + ["ok"] * 5


# --- PostgreSQL only --------------------------------------------------------------------
@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Any]:
    from cnnd.server.store.postgres import PostgresStore

    s = PostgresStore(pg_url)
    yield s
    s.close()


def test_pg_migrations_run_once_when_replicas_start_together(pg_url: str) -> None:
    import psycopg

    from cnnd.server.store.postgres import MIGRATIONS, PostgresStore

    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresStore(pg_url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4
    stores.append(PostgresStore(pg_url))  # and again, on a migrated database
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    make_model(stores[0])
    assert [m.name for m in stores[-1].list_models(10)] == ["m"]
    for s in stores:
        s.close()


def test_pg_refuses_a_database_with_a_newer_schema(pg_url: str, pg_store: Any) -> None:
    import psycopg

    from cnnd.server.store.postgres import PostgresStore

    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (999, 'x')")
    with pytest.raises(RuntimeError, match="schema version 999"):
        PostgresStore(pg_url)


def test_pg_is_not_ready_when_the_database_goes_away(pg_cluster: Any) -> None:
    from cnnd.server.store.postgres import PostgresStore

    pg_cluster.admin("CREATE DATABASE cnnd_goes_away")
    s = PostgresStore(pg_cluster.url("cnnd_goes_away"))
    try:
        assert s.ping()
        pg_cluster.admin("DROP DATABASE cnnd_goes_away WITH (FORCE)")
        assert not s.ping()
    finally:
        s.close()
        pg_cluster.admin("DROP DATABASE IF EXISTS cnnd_goes_away WITH (FORCE)")


def test_pg_job_needs_its_model_and_dataset(pg_store: Any) -> None:
    """A model deleted by another replica between the Train handler's check and the insert
    must not leave a job that can never run."""
    m, d = make_model(pg_store), make_dataset(pg_store)
    pg_store.delete_model(m.id)
    with pytest.raises(NotFound):
        make_job(pg_store, m, d)


def test_pg_lease_history_records_each_claim(pg_url: str, pg_store: Any) -> None:
    import psycopg

    m, d = make_model(pg_store), make_dataset(pg_store)
    job = make_job(pg_store, m, d)
    pg_store.claim_job("a", 0.3)
    time.sleep(0.5)
    pg_store.claim_job("b", 30)
    pg_store.renew_lease(job.id, "b", 30)
    pg_store.finish_job(job.id, "b", SUCCEEDED)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT attempt, worker, claimed_at, expires_at, ended_at FROM job_leases"
            " WHERE job_id = %s ORDER BY attempt",
            (job.id,),
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, "a"), (2, "b")]
    (_, _, claimed_a, expires_a, ended_a), (_, _, claimed_b, _, ended_b) = rows
    assert ended_a is None and claimed_b >= expires_a > claimed_a  # "a" died; "b" waited
    assert ended_b is not None
