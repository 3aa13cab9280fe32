"""The embedded store: SQLite (WAL) for metadata, files in the data dir for tensors.

Layout of the data dir::

    cnnd.db                   metadata (models, versions, datasets, jobs)
    lock                      held (flock) by the one server using this dir
    blobs/models/<id>/v<N>.npz
    blobs/datasets/<id>/{images,labels}.bin
    blobs/checkpoints/<job id>.npz
    tmp/                      uploads in progress; emptied at start-up

A row points at a file only once the file is complete: files are written to a temporary name,
fsynced and renamed before the row that names them is committed. Start-up removes what a crash
left behind (temporary files, blobs no row points at).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cnnd.core.io import atomic_write, fsync_dir
from cnnd.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from cnnd.server.failpoints import failpoint
from cnnd.server.store.base import (
    CANCELLED,
    QUEUED,
    RUNNING,
    BatchingPolicy,
    DatasetRecord,
    DatasetWriter,
    JobRecord,
    LeaseLost,
    ModelRecord,
    Store,
    VersionRecord,
    now,
)

MIGRATIONS = [
    # 1: the initial schema
    """
    CREATE TABLE models (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        seed INTEGER NOT NULL,
        parameter_count INTEGER NOT NULL,
        create_time REAL NOT NULL
    );
    CREATE TABLE versions (
        model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        create_time REAL NOT NULL,
        job_id TEXT NOT NULL,
        source TEXT NOT NULL,
        history TEXT NOT NULL,
        PRIMARY KEY (model_id, version)
    );
    CREATE TABLE datasets (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        sample_shape TEXT NOT NULL,
        dtype TEXT NOT NULL,
        num_classes INTEGER NOT NULL,
        sample_count INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        create_time REAL NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        model_id TEXT NOT NULL,
        dataset_id TEXT NOT NULL,
        state TEXT NOT NULL,
        config TEXT NOT NULL,
        progress TEXT NOT NULL DEFAULT '{}',
        history TEXT NOT NULL DEFAULT '[]',
        failure_reason TEXT NOT NULL DEFAULT '',
        result_version INTEGER NOT NULL DEFAULT 0,
        create_time REAL NOT NULL,
        start_time REAL,
        end_time REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_expires REAL NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state_seq ON jobs(state, seq);
    CREATE INDEX jobs_model ON jobs(model_id, seq);
    """,
    # 2: per-model batching policies (BatchingPolicy.to_dict as JSON; '{}': the defaults)
    """
    ALTER TABLE models ADD COLUMN batching TEXT NOT NULL DEFAULT '{}';
    """,
]


class _SQLiteDatasetWriter(DatasetWriter):
    def __init__(self, store: SQLiteStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.dir = store.root / "tmp" / f"upload-{uuid.uuid4().hex}"
        self.dir.mkdir(parents=True)
        self.images = open(self.dir / "images.bin", "wb")  # noqa: SIM115  (closed in _close)
        self.labels = open(self.dir / "labels.bin", "wb")  # noqa: SIM115
        self.written = 0
        self.done = False

    def _account(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise ResourceExhausted(
                f"upload exceeds the dataset size limit of {self.max_bytes:,} bytes"
            )

    def write_images(self, chunk: bytes) -> None:
        self._account(len(chunk))
        self.images.write(chunk)

    def write_labels(self, chunk: bytes) -> None:
        self._account(len(chunk))
        self.labels.write(chunk)

    def _close(self) -> None:
        for f in (self.images, self.labels):
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._close()
        return _read_raw(self.dir / "images.bin"), _read_raw(self.dir / "labels.bin")

    def commit(self, record: DatasetRecord) -> DatasetRecord:
        self._close()
        final = self.store.root / "blobs" / "datasets" / record.id
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.store._write() as db:
            if db.execute("SELECT 1 FROM datasets WHERE name = ?", (record.name,)).fetchone():
                raise AlreadyExists(f"a dataset named {record.name!r} already exists", "name")
            os.replace(self.dir, final)
            fsync_dir(final.parent)
            db.execute(
                "INSERT INTO datasets VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM datasets),"
                " ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.name, json.dumps(list(record.sample_shape)), record.dtype,
                    record.num_classes, record.sample_count, record.size_bytes, record.sha256,
                    record.create_time,
                ),
            )  # fmt: skip
        self.done = True
        return record

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.done = True


def _read_raw(path: Path) -> np.ndarray:
    """Raw bytes of a file as a read-only uint8 memmap (empty files give an empty array)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class SQLiteStore(Store):
    """Embedded store; one server process per data dir (enforced with a file lock)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # models and data are private
        self._lock_file = open(self.root / "lock", "a+")  # noqa: SIM115  (held for our lifetime)
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock_file.close()
            raise Unavailable(f"data dir {self.root} is in use by another cnnd server") from e
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._migrate()
        self._clean()

    # --- connections --------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.root / "cnnd.db", timeout=30, isolation_level=None, check_same_thread=True
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the RPC that made it answers.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction at a time (BEGIN IMMEDIATE under a process lock)."""
        db = self._db()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _migrate(self) -> None:
        db = self._db()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {i}")
            db.execute("COMMIT")

    def _clean(self) -> None:
        """Remove what a crash left: uploads in progress, temp files, unreferenced blobs."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir()
        blobs = self.root / "blobs"
        for tmp in blobs.rglob(".*.tmp") if blobs.exists() else []:
            tmp.unlink(missing_ok=True)
        db = self._db()
        known = {r[0] for r in db.execute("SELECT id FROM datasets")}
        for d in (blobs / "datasets").glob("*") if (blobs / "datasets").exists() else []:
            if d.name not in known:
                shutil.rmtree(d, ignore_errors=True)
        versions = {(r[0], r[1]) for r in db.execute("SELECT model_id, version FROM versions")}
        for f in (blobs / "models").glob("*/v*.npz") if (blobs / "models").exists() else []:
            if (f.parent.name, int(f.stem[1:])) not in versions:
                f.unlink(missing_ok=True)

    def integrity_check(self) -> str:
        return str(self._db().execute("PRAGMA integrity_check").fetchone()[0])

    # --- models -------------------------------------------------------------------------
    def _model(self, row: sqlite3.Row) -> ModelRecord:
        m = ModelRecord(
            id=row["id"], name=row["name"], spec=json.loads(row["spec"]), seed=row["seed"],
            parameter_count=row["parameter_count"], create_time=row["create_time"],
            batching=BatchingPolicy.from_dict(json.loads(row["batching"])),
        )  # fmt: skip
        rows = self._db().execute(
            "SELECT * FROM versions WHERE model_id = ? ORDER BY version", (m.id,)
        )
        m.versions = [self._version(r) for r in rows]
        return m

    @staticmethod
    def _version(r: sqlite3.Row) -> VersionRecord:
        return VersionRecord(
            model_id=r["model_id"], version=r["version"], create_time=r["create_time"],
            job_id=r["job_id"], source=r["source"], history=json.loads(r["history"]),
        )  # fmt: skip

    def create_model(self, record: ModelRecord) -> ModelRecord:
        with self._write() as db:
            if db.execute("SELECT 1 FROM models WHERE name = ?", (record.name,)).fetchone():
                raise AlreadyExists(f"a model named {record.name!r} already exists", "name")
            db.execute(
                "INSERT INTO models (id, seq, name, spec, seed, parameter_count, create_time,"
                " batching) VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM models),"
                " ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.name, json.dumps(record.spec), record.seed,
                    record.parameter_count, record.create_time,
                    json.dumps(record.batching.to_dict()),
                ),
            )  # fmt: skip
        return record

    def get_model(self, key: str) -> ModelRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT * FROM models WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                (key, key, key),
            )
            .fetchone()
        )
        return self._model(row) if row else None

    def list_models(self, limit: int, after: str = "") -> list[ModelRecord]:
        rows = (
            self._db()
            .execute(
                "SELECT * FROM models WHERE seq > "
                "COALESCE((SELECT seq FROM models WHERE id = ?), 0) ORDER BY seq LIMIT ?",
                (after, limit),
            )
            .fetchall()
        )
        return [self._model(r) for r in rows]

    def update_model_batching(
        self, model_id: str, batching: BatchingPolicy, fields: Collection[str]
    ) -> ModelRecord:
        with self._write() as db:
            row = db.execute("SELECT batching FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                raise NotFound(f"no model {model_id!r}", "model_id")
            merged = BatchingPolicy.from_dict(json.loads(row[0])).merge(batching, fields)
            db.execute(
                "UPDATE models SET batching = ? WHERE id = ?",
                (json.dumps(merged.to_dict()), model_id),
            )
            updated = db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
            return self._model(updated)

    def delete_model(self, model_id: str) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone():
                raise NotFound(f"no model {model_id!r}", "model_id")
            active = db.execute(
                "SELECT id FROM jobs WHERE model_id = ? AND state IN (?, ?) LIMIT 1",
                (model_id, QUEUED, RUNNING),
            ).fetchone()
            if active:
                raise FailedPrecondition(
                    f"model {model_id} has an active job {active[0]}; cancel it first"
                )
            db.execute("DELETE FROM versions WHERE model_id = ?", (model_id,))
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        shutil.rmtree(self.root / "blobs" / "models" / model_id, ignore_errors=True)

    def add_version(
        self, model_id: str, weights: bytes, job_id: str, source: str, history: list[dict[str, Any]]
    ) -> VersionRecord:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone():
                raise NotFound(f"no model {model_id!r}", "model_id")
            version = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE model_id = ?",
                (model_id,),
            ).fetchone()[0]
            # The file is complete (fsync + rename) before the row that names it commits.
            atomic_write(self._weights_path(model_id, version), weights)
            failpoint("version.commit")
            record = VersionRecord(model_id, version, now(), job_id, source, history)
            db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                (model_id, version, record.create_time, job_id, source, json.dumps(history)),
            )
        return record

    def _weights_path(self, model_id: str, version: int) -> Path:
        return self.root / "blobs" / "models" / model_id / f"v{version}.npz"

    def get_weights(self, model_id: str, version: int) -> bytes:
        row = (
            self._db()
            .execute(
                "SELECT 1 FROM versions WHERE model_id = ? AND version = ?", (model_id, version)
            )
            .fetchone()
        )
        if not row:
            raise NotFound(f"model {model_id} has no version {version}", "version")
        return self._weights_path(model_id, version).read_bytes()

    # --- datasets -----------------------------------------------------------------------
    @contextmanager
    def dataset_writer(self, max_bytes: int) -> Iterator[DatasetWriter]:
        writer = _SQLiteDatasetWriter(self, max_bytes)
        try:
            yield writer
        finally:
            if not writer.done:
                writer.abort()

    @staticmethod
    def _dataset(r: sqlite3.Row) -> DatasetRecord:
        return DatasetRecord(
            id=r["id"], name=r["name"], sample_shape=tuple(json.loads(r["sample_shape"])),
            dtype=r["dtype"], num_classes=r["num_classes"], sample_count=r["sample_count"],
            size_bytes=r["size_bytes"], sha256=r["sha256"], create_time=r["create_time"],
        )  # fmt: skip

    def get_dataset(self, key: str) -> DatasetRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT * FROM datasets WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                (key, key, key),
            )
            .fetchone()
        )
        return self._dataset(row) if row else None

    def list_datasets(self, limit: int, after: str = "") -> list[DatasetRecord]:
        rows = (
            self._db()
            .execute(
                "SELECT * FROM datasets WHERE seq > "
                "COALESCE((SELECT seq FROM datasets WHERE id = ?), 0) ORDER BY seq LIMIT ?",
                (after, limit),
            )
            .fetchall()
        )
        return [self._dataset(r) for r in rows]

    def delete_dataset(self, dataset_id: str) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone():
                raise NotFound(f"no dataset {dataset_id!r}", "dataset_id")
            active = db.execute(
                "SELECT id, config FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)
            ).fetchall()
            for job_id, config in active:
                cfg = json.loads(config)
                if dataset_id in (cfg.get("dataset_id"), cfg.get("validation_dataset_id")):
                    raise FailedPrecondition(
                        f"dataset {dataset_id} is used by active job {job_id}; cancel it first"
                    )
            db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
        shutil.rmtree(self.root / "blobs" / "datasets" / dataset_id, ignore_errors=True)

    def load_dataset(self, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
        record = self.get_dataset(dataset_id)
        if record is None or record.id != dataset_id:
            raise NotFound(f"no dataset {dataset_id!r}", "dataset_id")
        d = self.root / "blobs" / "datasets" / dataset_id
        shape = (record.sample_count, *record.sample_shape)
        if record.sample_count == 0:
            return np.empty(shape, dtype=record.dtype), np.empty(0, dtype=np.int32)
        x = np.memmap(d / "images.bin", dtype=record.dtype, mode="r", shape=shape)
        y = np.memmap(d / "labels.bin", dtype="<i4", mode="r", shape=(record.sample_count,))
        return x, y

    # --- jobs ---------------------------------------------------------------------------
    @staticmethod
    def _job(r: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=r["id"], model_id=r["model_id"], dataset_id=r["dataset_id"], state=r["state"],
            config=json.loads(r["config"]), create_time=r["create_time"], seq=r["seq"],
            progress=json.loads(r["progress"]), history=json.loads(r["history"]),
            failure_reason=r["failure_reason"], result_version=r["result_version"],
            start_time=r["start_time"], end_time=r["end_time"], attempts=r["attempts"],
            lease_owner=r["lease_owner"], lease_expires=r["lease_expires"],
            cancel_requested=bool(r["cancel_requested"]),
        )  # fmt: skip

    def create_job(self, record: JobRecord, max_queued: int) -> JobRecord:
        with self._write() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()
            if queued[0] >= max_queued:
                raise ResourceExhausted(
                    f"{queued[0]} jobs are already queued (the limit); retry when some finish"
                )
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, model_id, dataset_id, state, config, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, seq, record.model_id, record.dataset_id, QUEUED,
                    json.dumps(record.config), record.create_time,
                ),
            )  # fmt: skip
        record.seq = seq
        record.state = QUEUED
        return record

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(
        self, limit: int, after: str = "", model_id: str = "", state: str = ""
    ) -> list[JobRecord]:
        rows = (
            self._db()
            .execute(
                "SELECT * FROM jobs WHERE seq > COALESCE((SELECT seq FROM jobs WHERE id = ?), 0)"
                " AND (? = '' OR model_id = ?) AND (? = '' OR state = ?) ORDER BY seq LIMIT ?",
                (after, model_id, model_id, state, state, limit),
            )
            .fetchall()
        )
        return [self._job(r) for r in rows]

    def queue_position(self, job_id: str) -> int:
        row = (
            self._db()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq <= "
                "(SELECT seq FROM jobs WHERE id = ? AND state = ?)",
                (QUEUED, job_id, QUEUED),
            )
            .fetchone()
        )
        return int(row[0])

    def claim_job(self, worker: str, lease_seconds: float) -> JobRecord | None:
        t = now()
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? OR (state = ? AND lease_expires < ?)"
                " ORDER BY seq LIMIT 1",
                (QUEUED, RUNNING, t),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, lease_owner = ?, lease_expires = ?,"
                " attempts = attempts + 1, start_time = COALESCE(start_time, ?) WHERE id = ?",
                (RUNNING, worker, t + lease_seconds, t, row[0]),
            )
            job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone())
        return job

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = ? AND lease_owner = ?",
                (now() + lease_seconds, job_id, RUNNING, worker),
            )
        return cur.rowcount == 1

    def _check_lease(self, db: sqlite3.Connection, job_id: str, worker: str) -> None:
        row = db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND state = ? AND lease_owner = ?",
            (job_id, RUNNING, worker),
        ).fetchone()
        if row is None:
            raise LeaseLost(f"{worker} no longer holds job {job_id}")

    def update_progress(
        self, job_id: str, worker: str, progress: dict[str, Any], history: list[dict[str, Any]]
    ) -> None:
        with self._write() as db:
            self._check_lease(db, job_id, worker)
            db.execute(
                "UPDATE jobs SET progress = ?, history = ? WHERE id = ?",
                (json.dumps(progress), json.dumps(history), job_id),
            )

    def finish_job(
        self,
        job_id: str,
        worker: str,
        state: str,
        reason: str = "",
        result_version: int = 0,
        history: list[dict[str, Any]] | None = None,
    ) -> JobRecord:
        with self._write() as db:
            self._check_lease(db, job_id, worker)
            db.execute(
                "UPDATE jobs SET state = ?, failure_reason = ?, result_version = ?, end_time = ?,"
                " lease_owner = '', lease_expires = 0, history = COALESCE(?, history)"
                " WHERE id = ?",
                (
                    state, reason, result_version, now(),
                    None if history is None else json.dumps(history), job_id,
                ),
            )  # fmt: skip
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def release_job(self, job_id: str, worker: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, lease_owner = '', lease_expires = 0"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (QUEUED, job_id, RUNNING, worker),
            )

    def cancel_job(self, job_id: str) -> JobRecord:
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r}", "job_id")
            if row["state"] == QUEUED:
                db.execute(
                    "UPDATE jobs SET state = ?, end_time = ?, cancel_requested = 1 WHERE id = ?",
                    (CANCELLED, now(), job_id),
                )
            elif row["state"] == RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise FailedPrecondition(f"job {job_id} already ended: {row['state']}")
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def recover(self) -> list[str]:
        with self._write() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            db.execute(
                "UPDATE jobs SET lease_owner = '', lease_expires = 0 WHERE state = ?", (RUNNING,)
            )
        return [r[0] for r in rows]

    # --- checkpoints --------------------------------------------------------------------
    def _checkpoint_path(self, job_id: str) -> Path:
        return self.root / "blobs" / "checkpoints" / f"{job_id}.npz"

    def put_checkpoint(self, job_id: str, worker: str, data: bytes) -> None:
        with self._write() as db:
            self._check_lease(db, job_id, worker)
            atomic_write(
                self._checkpoint_path(job_id), data,
                midway=lambda: failpoint("checkpoint.partial"),
                before_rename=lambda: failpoint("checkpoint.rename"),
            )  # fmt: skip

    def get_checkpoint(self, job_id: str) -> bytes | None:
        path = self._checkpoint_path(job_id)
        return path.read_bytes() if path.exists() else None

    def delete_checkpoint(self, job_id: str) -> None:
        self._checkpoint_path(job_id).unlink(missing_ok=True)

    # --- misc ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        db = self._db()
        out = {
            "models": db.execute("SELECT COUNT(*) FROM models").fetchone()[0],
            "versions": db.execute("SELECT COUNT(*) FROM versions").fetchone()[0],
            "datasets": db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0],
        }
        for state, count in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[f"jobs_{state}"] = count
        blobs = self.root / "blobs"
        out["bytes"] = (
            sum(f.stat().st_size for f in blobs.rglob("*") if f.is_file())
            if (blobs.exists())
            else 0
        )
        db_files = [self.root / n for n in ("cnnd.db", "cnnd.db-wal")]
        out["bytes"] += sum(f.stat().st_size for f in db_files if f.exists())
        return out

    def ping(self) -> bool:
        try:
            self._db().execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
