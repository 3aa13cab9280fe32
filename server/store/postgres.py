"""The scale-out store: metadata, the job queue and every tensor in one PostgreSQL database,
shared by any number of cnnd replicas.

Why everything lives in the database: replicas then need no shared volume, and a version, a
dataset or a checkpoint becomes visible in the same transaction that completes its bytes, so
no replica can ever see a row whose bytes are missing or half-written.

Tables (created by ``MIGRATIONS``, recorded in ``schema_migrations``)::

    models, versions, datasets, jobs    the records of base.py (JSON kept as text, like SQLite)
    job_leases                          one row per claim: who held a job, from when to when
    checkpoints                         which job has a checkpoint, and its size
    blobs(owner, part, chunk, data)     tensors as 1 MiB bytea chunks; ``owner`` names the row
                                        they belong to: model:<id> (part v<N>), checkpoint:<job>,
                                        upload:<uuid> (parts images and labels)

Leases use the database clock (``now()``), so the replicas' own clocks never matter: a job is
claimable when it is QUEUED, or RUNNING with ``lease_expires < now()``. Claims take the job row
with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on, nor take, the same job.
Writes that belong to a job's runner (progress, checkpoint, finish) are fenced: they match the
row on ``lease_owner`` in the statement that writes, and raise LeaseLost when it no longer
matches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

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
)

log = logging.getLogger("cnnd.store")

CHUNK = 1 << 20  # bytes per blobs row: large enough to be cheap, small enough to stream
NOTIFY_CHANNEL = "cnnd_versions"
# pg_advisory_xact_lock keys (any two constants unique to cnnd).
MIGRATION_LOCK = 0x636E6E64_0001
QUEUE_LOCK = 0x636E6E64_0002
STARTUP_WAIT = 30.0  # seconds to wait for the database at start (it may start with us)
PING_TIMEOUT = 2.0
POOL_TIMEOUT = 10.0  # seconds a call waits for a connection before it fails UNAVAILABLE

MIGRATIONS: list[tuple[str, str]] = [
    (
        "initial schema",
        """
        CREATE TABLE models (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            name text NOT NULL UNIQUE,
            spec text NOT NULL,
            seed bigint NOT NULL,
            parameter_count bigint NOT NULL,
            create_time double precision NOT NULL
        );
        CREATE TABLE versions (
            model_id text NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            version integer NOT NULL,
            create_time double precision NOT NULL,
            job_id text NOT NULL,
            source text NOT NULL,
            history text NOT NULL,
            size_bytes bigint NOT NULL,
            PRIMARY KEY (model_id, version)
        );
        CREATE TABLE datasets (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            name text NOT NULL UNIQUE,
            sample_shape text NOT NULL,
            dtype text NOT NULL,
            num_classes integer NOT NULL,
            sample_count bigint NOT NULL,
            size_bytes bigint NOT NULL,
            sha256 text NOT NULL,
            create_time double precision NOT NULL,
            blob text NOT NULL
        );
        CREATE TABLE jobs (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            model_id text NOT NULL,
            dataset_id text NOT NULL,
            validation_dataset_id text NOT NULL DEFAULT '',
            state text NOT NULL
                CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
            config text NOT NULL,
            progress text NOT NULL DEFAULT '{}',
            history text NOT NULL DEFAULT '[]',
            failure_reason text NOT NULL DEFAULT '',
            result_version integer NOT NULL DEFAULT 0,
            create_time double precision NOT NULL,
            start_time double precision,
            end_time double precision,
            attempts integer NOT NULL DEFAULT 0,
            lease_owner text NOT NULL DEFAULT '',
            lease_expires timestamptz,
            cancel_requested boolean NOT NULL DEFAULT false
        );
        CREATE INDEX jobs_active_seq ON jobs (seq) WHERE state IN ('QUEUED', 'RUNNING');
        CREATE INDEX jobs_model_seq ON jobs (model_id, seq);
        CREATE TABLE job_leases (
            job_id text NOT NULL REFERENCES jobs(id),
            attempt integer NOT NULL,
            worker text NOT NULL,
            claimed_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            ended_at timestamptz,
            PRIMARY KEY (job_id, attempt)
        );
        CREATE TABLE checkpoints (
            job_id text PRIMARY KEY REFERENCES jobs(id),
            worker text NOT NULL,
            size_bytes bigint NOT NULL,
            create_time double precision NOT NULL
        );
        CREATE TABLE blobs (
            owner text NOT NULL,
            part text NOT NULL,
            chunk integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (owner, part, chunk)
        );
        -- tensors do not compress: store them out of line without trying
        ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;
        """,
    ),
    (
        "per-model batching policies",
        # BatchingPolicy.to_dict as JSON; '{}': the server's defaults
        "ALTER TABLE models ADD COLUMN IF NOT EXISTS batching text NOT NULL DEFAULT '{}';",
    ),
]

_EPOCH_NOW = "extract(epoch FROM now())::float8"
_JOB_COLUMNS = (
    "id, seq, model_id, dataset_id, state, config, progress, history, failure_reason,"
    " result_version, create_time, start_time, end_time, attempts, lease_owner,"
    " COALESCE(extract(epoch FROM lease_expires)::float8, 0) AS lease_expires, cancel_requested"
)


# Connection settings unless the URL sets them: fail fast on a dead or unreachable server
# (keepalives and tcp_user_timeout end calls on a silently dropped connection in ~10 s instead
# of the minutes TCP would wait), so readiness turns NOT_SERVING instead of hanging.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "cnnd",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def _connection_kwargs(url: str) -> dict[str, Any]:
    given = conninfo_to_dict(url)
    return {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}


def _unavailable(e: Exception) -> Unavailable:
    return Unavailable(f"the store (PostgreSQL) is unreachable: {e}".strip())


# --- blobs ------------------------------------------------------------------------------
def _insert_chunks(
    conn: psycopg.Connection[Any], owner: str, part: str, data: bytes | memoryview, first: int = 0
) -> int:
    """Write ``data`` as chunks ``first``, ``first + 1``, ...; returns the next chunk number."""
    view = memoryview(data)
    rows = [
        (owner, part, first + i, view[lo : lo + CHUNK])
        for i, lo in enumerate(range(0, len(view), CHUNK))
    ]
    if rows:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO blobs (owner, part, chunk, data) VALUES (%s, %s, %s, %s)", rows
            )
    return first + len(rows)


def _read_into(conn: psycopg.Connection[Any], owner: str, part: str, size: int) -> np.ndarray:
    """A blob streamed chunk by chunk into one preallocated read-only uint8 array; NotFound
    when its bytes do not add up to ``size`` (it was deleted meanwhile)."""
    out = np.empty(size, dtype=np.uint8)
    pos = 0
    with conn.cursor(row_factory=tuple_row) as cur:
        for (chunk,) in cur.stream(
            "SELECT data FROM blobs WHERE owner = %s AND part = %s ORDER BY chunk", (owner, part)
        ):
            n = len(chunk)
            if pos + n > size:
                raise NotFound(f"blob {owner}/{part} is larger than recorded")
            out[pos : pos + n] = np.frombuffer(chunk, dtype=np.uint8)
            pos += n
    if pos != size:
        raise NotFound(f"blob {owner}/{part} is gone")
    out.setflags(write=False)
    return out


def _model_owner(model_id: str) -> str:
    return f"model:{model_id}"


def _checkpoint_owner(job_id: str) -> str:
    return f"checkpoint:{job_id}"


# --- records ----------------------------------------------------------------------------
def _version(r: dict[str, Any]) -> VersionRecord:
    return VersionRecord(
        model_id=r["model_id"], version=r["version"], create_time=r["create_time"],
        job_id=r["job_id"], source=r["source"], history=json.loads(r["history"]),
    )  # fmt: skip


def _model(r: dict[str, Any], versions: list[VersionRecord]) -> ModelRecord:
    return ModelRecord(
        id=r["id"], name=r["name"], spec=json.loads(r["spec"]), seed=r["seed"],
        parameter_count=r["parameter_count"], create_time=r["create_time"], versions=versions,
        batching=BatchingPolicy.from_dict(json.loads(r["batching"])),
    )  # fmt: skip


def _dataset(r: dict[str, Any]) -> DatasetRecord:
    return DatasetRecord(
        id=r["id"], name=r["name"], sample_shape=tuple(json.loads(r["sample_shape"])),
        dtype=r["dtype"], num_classes=r["num_classes"], sample_count=r["sample_count"],
        size_bytes=r["size_bytes"], sha256=r["sha256"], create_time=r["create_time"],
    )  # fmt: skip


def _job(r: dict[str, Any]) -> JobRecord:
    return JobRecord(
        id=r["id"], model_id=r["model_id"], dataset_id=r["dataset_id"], state=r["state"],
        config=json.loads(r["config"]), create_time=r["create_time"], seq=r["seq"],
        progress=json.loads(r["progress"]), history=json.loads(r["history"]),
        failure_reason=r["failure_reason"], result_version=r["result_version"],
        start_time=r["start_time"], end_time=r["end_time"], attempts=r["attempts"],
        lease_owner=r["lease_owner"], lease_expires=r["lease_expires"],
        cancel_requested=r["cancel_requested"],
    )  # fmt: skip


def _image_bytes(record: DatasetRecord) -> int:
    return record.sample_count * int(np.prod(record.sample_shape)) * np.dtype(record.dtype).itemsize


# --- the dataset writer -----------------------------------------------------------------
class _PostgresDatasetWriter(DatasetWriter):
    """Streams an upload into ``blobs`` inside one transaction on a connection of its own.

    Chunks go to the database as they fill (at most 1 MiB per part is buffered here); the
    transaction commits together with the dataset row, so a dataset is never visible without
    all its bytes, and an abort, a failed check or a crash of this process (the database rolls
    back the transaction of a lost connection) leaves nothing behind.
    """

    def __init__(self, store: PostgresStore, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.owner = f"upload:{uuid.uuid4().hex}"
        self.conn = store._connect()
        self.written = 0
        self.done = False
        self._buffers = {"images": bytearray(), "labels": bytearray()}
        self._next_chunk = {"images": 0, "labels": 0}
        self._sizes = {"images": 0, "labels": 0}

    def _write(self, part: str, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.max_bytes:
            raise ResourceExhausted(
                f"upload exceeds the dataset size limit of {self.max_bytes:,} bytes"
            )
        buf = self._buffers[part]
        buf += chunk
        self._sizes[part] += len(chunk)
        if len(buf) >= CHUNK:
            whole = len(buf) - len(buf) % CHUNK
            self._flush(part, whole)

    def _flush(self, part: str, n: int | None = None) -> None:
        buf = self._buffers[part]
        n = len(buf) if n is None else n
        if n == 0:
            return
        try:
            self._next_chunk[part] = _insert_chunks(
                self.conn, self.owner, part, bytes(buf[:n]), self._next_chunk[part]
            )
        except psycopg.OperationalError as e:
            raise _unavailable(e) from e
        del buf[:n]

    def write_images(self, chunk: bytes) -> None:
        self._write("images", chunk)

    def write_labels(self, chunk: bytes) -> None:
        self._write("labels", chunk)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        for part in self._buffers:
            self._flush(part)
        return (
            _read_into(self.conn, self.owner, "images", self._sizes["images"]),
            _read_into(self.conn, self.owner, "labels", self._sizes["labels"]),
        )

    def commit(self, record: DatasetRecord) -> DatasetRecord:
        for part in self._buffers:
            self._flush(part)
        try:
            self.conn.execute(
                "INSERT INTO datasets (id, name, sample_shape, dtype, num_classes, sample_count,"
                " size_bytes, sha256, create_time, blob)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.id, record.name, json.dumps(list(record.sample_shape)), record.dtype,
                    record.num_classes, record.sample_count, record.size_bytes, record.sha256,
                    record.create_time, self.owner,
                ),
            )  # fmt: skip
            self.conn.commit()
        except pg_errors.UniqueViolation as e:
            self.abort()
            raise AlreadyExists(f"a dataset named {record.name!r} already exists", "name") from e
        except psycopg.OperationalError as e:
            self.abort()
            raise _unavailable(e) from e
        self.done = True
        self.conn.close()
        return record

    def abort(self) -> None:
        self.done = True
        try:
            self.conn.rollback()
        except psycopg.Error:
            pass  # a broken connection rolled back on its own
        finally:
            self.conn.close()


# --- the store --------------------------------------------------------------------------
class PostgresStore(Store):
    """The store shared by several replicas; every method is one short transaction from a
    thread-safe connection pool (uploads and LISTEN use connections of their own)."""

    def __init__(self, url: str, min_connections: int = 1, max_connections: int = 10) -> None:
        self.url = url
        self._kwargs = _connection_kwargs(url)
        self._closed = threading.Event()
        self._migrate(self._connect_at_start())
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            kwargs={"row_factory": dict_row, **self._kwargs},
            min_size=min_connections,
            max_size=max_connections,
            timeout=POOL_TIMEOUT,
            check=ConnectionPool.check_connection,  # drop connections a DB restart broke
            name="cnnd",
            open=True,
        )

    # --- connections --------------------------------------------------------------------
    def _connect(self, autocommit: bool = False) -> psycopg.Connection[dict[str, Any]]:
        try:
            return psycopg.connect(
                self.url, autocommit=autocommit, row_factory=dict_row, **self._kwargs
            )
        except psycopg.OperationalError as e:
            raise _unavailable(e) from e

    def _connect_at_start(self) -> psycopg.Connection[dict[str, Any]]:
        """A first connection, waiting a while for a database that is still starting (as in a
        Kubernetes deployment that starts it alongside the replicas)."""
        deadline = time.monotonic() + STARTUP_WAIT
        while True:
            try:
                return self._connect()
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("waiting for PostgreSQL to accept connections")
                time.sleep(1.0)

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """One transaction: committed when the block ends, rolled back when it raises. A
        database that cannot be reached becomes Unavailable, which clients retry."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            raise _unavailable(e) from e

    def _migrate(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        """Apply the migrations this database lacks, in one transaction under an advisory lock,
        so that replicas starting together apply each exactly once."""
        with conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r["version"] for r in conn.execute("SELECT version FROM schema_migrations")}
            newest = max(applied, default=0)
            if newest > len(MIGRATIONS):
                raise RuntimeError(
                    f"the database has schema version {newest}; this cnnd knows only up to "
                    f"{len(MIGRATIONS)}: upgrade cnnd"
                )
            for version, (description, script) in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                conn.execute(script)  # type: ignore[arg-type]  (a constant of this module)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                    (version, description),
                )
                log.info("applied schema migration %d: %s", version, description)

    # --- models -------------------------------------------------------------------------
    def _with_versions(
        self, conn: psycopg.Connection[dict[str, Any]], rows: list[dict[str, Any]]
    ) -> list[ModelRecord]:
        ids = [r["id"] for r in rows]
        versions: dict[str, list[VersionRecord]] = {i: [] for i in ids}
        for v in conn.execute(
            "SELECT * FROM versions WHERE model_id = ANY(%s) ORDER BY model_id, version", (ids,)
        ):
            versions[v["model_id"]].append(_version(v))
        return [_model(r, versions[r["id"]]) for r in rows]

    def create_model(self, record: ModelRecord) -> ModelRecord:
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO models (id, name, spec, seed, parameter_count, create_time,"
                    " batching) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        record.id, record.name, json.dumps(record.spec), record.seed,
                        record.parameter_count, record.create_time,
                        json.dumps(record.batching.to_dict()),
                    ),
                )  # fmt: skip
        except pg_errors.UniqueViolation as e:
            raise AlreadyExists(f"a model named {record.name!r} already exists", "name") from e
        return record

    def get_model(self, key: str) -> ModelRecord | None:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM models WHERE id = %s OR name = %s ORDER BY id = %s DESC LIMIT 1",
                (key, key, key),
            ).fetchall()
            return self._with_versions(conn, rows)[0] if rows else None

    def list_models(self, limit: int, after: str = "") -> list[ModelRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM models WHERE seq > "
                "COALESCE((SELECT seq FROM models WHERE id = %s), 0) ORDER BY seq LIMIT %s",
                (after, limit),
            ).fetchall()
            return self._with_versions(conn, rows)

    def update_model_batching(
        self, model_id: str, batching: BatchingPolicy, fields: Collection[str]
    ) -> ModelRecord:
        with self._tx() as conn:
            # The row lock serialises updates of one model across replicas (read, merge, write).
            row = conn.execute(
                "SELECT batching FROM models WHERE id = %s FOR NO KEY UPDATE", (model_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no model {model_id!r}", "model_id")
            merged = BatchingPolicy.from_dict(json.loads(row["batching"])).merge(batching, fields)
            rows = conn.execute(
                "UPDATE models SET batching = %s WHERE id = %s RETURNING *",
                (json.dumps(merged.to_dict()), model_id),
            ).fetchall()
            return self._with_versions(conn, rows)[0]

    def delete_model(self, model_id: str) -> None:
        with self._tx() as conn:
            # The row lock orders this against create_job (FOR KEY SHARE) and add_version.
            if not conn.execute(
                "SELECT 1 FROM models WHERE id = %s FOR UPDATE", (model_id,)
            ).fetchone():
                raise NotFound(f"no model {model_id!r}", "model_id")
            active = conn.execute(
                "SELECT id FROM jobs WHERE model_id = %s AND state IN (%s, %s) LIMIT 1",
                (model_id, QUEUED, RUNNING),
            ).fetchone()
            if active:
                raise FailedPrecondition(
                    f"model {model_id} has an active job {active['id']}; cancel it first"
                )
            conn.execute("DELETE FROM blobs WHERE owner = %s", (_model_owner(model_id),))
            conn.execute("DELETE FROM models WHERE id = %s", (model_id,))  # versions cascade

    def add_version(
        self, model_id: str, weights: bytes, job_id: str, source: str, history: list[dict[str, Any]]
    ) -> VersionRecord:
        with self._tx() as conn:
            # Serialises version numbering per model, without blocking job creation.
            if not conn.execute(
                "SELECT 1 FROM models WHERE id = %s FOR NO KEY UPDATE", (model_id,)
            ).fetchone():
                raise NotFound(f"no model {model_id!r}", "model_id")
            row = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 AS v FROM versions WHERE model_id = %s",
                (model_id,),
            ).fetchone()
            version = int(row["v"])  # type: ignore[index]
            _insert_chunks(conn, _model_owner(model_id), f"v{version}", weights)
            failpoint("version.commit")  # a crash here rolls the weights back with the row
            r = conn.execute(
                "INSERT INTO versions (model_id, version, create_time, job_id, source, history,"
                f" size_bytes) VALUES (%s, %s, {_EPOCH_NOW}, %s, %s, %s, %s) RETURNING *",
                (model_id, version, job_id, source, json.dumps(history), len(weights)),
            ).fetchone()
            # Delivered to every listening replica when (and only if) this commits.
            conn.execute(
                "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, json.dumps([model_id, version]))
            )
        return _version(r)  # type: ignore[arg-type]

    def get_weights(self, model_id: str, version: int) -> bytes:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT size_bytes FROM versions WHERE model_id = %s AND version = %s",
                (model_id, version),
            ).fetchone()
            if row is None:
                raise NotFound(f"model {model_id} has no version {version}", "version")
            data = _read_into(conn, _model_owner(model_id), f"v{version}", row["size_bytes"])
        return data.tobytes()

    # --- datasets -----------------------------------------------------------------------
    @contextmanager
    def dataset_writer(self, max_bytes: int) -> Iterator[DatasetWriter]:
        writer = _PostgresDatasetWriter(self, max_bytes)
        try:
            yield writer
        finally:
            if not writer.done:
                writer.abort()

    def get_dataset(self, key: str) -> DatasetRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM datasets WHERE id = %s OR name = %s ORDER BY id = %s DESC LIMIT 1",
                (key, key, key),
            ).fetchone()
        return _dataset(row) if row else None

    def list_datasets(self, limit: int, after: str = "") -> list[DatasetRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM datasets WHERE seq > "
                "COALESCE((SELECT seq FROM datasets WHERE id = %s), 0) ORDER BY seq LIMIT %s",
                (after, limit),
            ).fetchall()
        return [_dataset(r) for r in rows]

    def delete_dataset(self, dataset_id: str) -> None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT blob FROM datasets WHERE id = %s FOR UPDATE", (dataset_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no dataset {dataset_id!r}", "dataset_id")
            active = conn.execute(
                "SELECT id FROM jobs WHERE state IN (%s, %s)"
                " AND (dataset_id = %s OR validation_dataset_id = %s) LIMIT 1",
                (QUEUED, RUNNING, dataset_id, dataset_id),
            ).fetchone()
            if active:
                raise FailedPrecondition(
                    f"dataset {dataset_id} is used by active job {active['id']}; cancel it first"
                )
            conn.execute("DELETE FROM blobs WHERE owner = %s", (row["blob"],))
            conn.execute("DELETE FROM datasets WHERE id = %s", (dataset_id,))

    def load_dataset(self, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE id = %s", (dataset_id,)).fetchone()
            if row is None:
                raise NotFound(f"no dataset {dataset_id!r}", "dataset_id")
            record = _dataset(row)
            n = record.sample_count
            images = _read_into(conn, row["blob"], "images", _image_bytes(record))
            labels = _read_into(conn, row["blob"], "labels", n * 4)
        x = images.view(record.dtype).reshape((n, *record.sample_shape))
        return x, labels.view("<i4")

    # --- jobs ---------------------------------------------------------------------------
    def create_job(self, record: JobRecord, max_queued: int) -> JobRecord:
        validation = str(record.config.get("validation_dataset_id") or "")
        with self._tx() as conn:
            # One creator at a time across replicas, so the limit holds exactly.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK,))
            # Key-share locks: a concurrent delete of the model or a dataset waits for us, and
            # then sees this job (and refuses); or it went first and we refuse.
            if not conn.execute(
                "SELECT 1 FROM models WHERE id = %s FOR KEY SHARE", (record.model_id,)
            ).fetchone():
                raise NotFound(f"no model {record.model_id!r}", "model_id")
            for key, field in ((record.dataset_id, "dataset_id"), (validation, "validation")):
                if (
                    key
                    and not conn.execute(
                        "SELECT 1 FROM datasets WHERE id = %s FOR KEY SHARE", (key,)
                    ).fetchone()
                ):
                    raise NotFound(f"no dataset {key!r}", field)
            queued = conn.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE state = %s", (QUEUED,)
            ).fetchone()["n"]  # type: ignore[index]
            if queued >= max_queued:
                raise ResourceExhausted(
                    f"{queued} jobs are already queued (the limit); retry when some finish"
                )
            row = conn.execute(
                "INSERT INTO jobs (id, model_id, dataset_id, validation_dataset_id, state,"
                " config, create_time) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING seq",
                (
                    record.id, record.model_id, record.dataset_id, validation, QUEUED,
                    json.dumps(record.config), record.create_time,
                ),
            ).fetchone()  # fmt: skip
        record.seq = row["seq"]  # type: ignore[index]
        record.state = QUEUED
        return record

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
        return _job(row) if row else None

    def list_jobs(
        self, limit: int, after: str = "", model_id: str = "", state: str = ""
    ) -> list[JobRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs"
                " WHERE seq > COALESCE((SELECT seq FROM jobs WHERE id = %s), 0)"
                " AND (%s = '' OR model_id = %s) AND (%s = '' OR state = %s)"
                " ORDER BY seq LIMIT %s",
                (after, model_id, model_id, state, state, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def queue_position(self, job_id: str) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE state = %s AND seq <= "
                "(SELECT seq FROM jobs WHERE id = %s AND state = %s)",
                (QUEUED, job_id, QUEUED),
            ).fetchone()
        return int(row["n"])  # type: ignore[index]

    def claim_job(self, worker: str, lease_seconds: float) -> JobRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                "WITH pick AS (SELECT id AS pick_id FROM jobs WHERE state = %s"
                " OR (state = %s AND lease_expires < now())"
                " ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " UPDATE jobs SET state = %s, lease_owner = %s,"
                " lease_expires = now() + make_interval(secs => %s), attempts = attempts + 1,"
                f" start_time = COALESCE(start_time, {_EPOCH_NOW})"
                f" FROM pick WHERE id = pick_id RETURNING {_JOB_COLUMNS}",
                (QUEUED, RUNNING, RUNNING, worker, lease_seconds),
            ).fetchone()
            if row is None:
                return None
            # The lease history: who held the job when (operators read it after a failover).
            conn.execute(
                "INSERT INTO job_leases (job_id, attempt, worker, claimed_at, expires_at)"
                " SELECT id, attempts, lease_owner, now(), lease_expires FROM jobs WHERE id = %s",
                (row["id"],),
            )
        return _job(row)

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET lease_expires = now() + make_interval(secs => %s)"
                " WHERE id = %s AND state = %s AND lease_owner = %s"
                " RETURNING attempts, lease_expires",
                (lease_seconds, job_id, RUNNING, worker),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE job_leases SET expires_at = %s WHERE job_id = %s AND attempt = %s",
                (row["lease_expires"], job_id, row["attempts"]),
            )
        return True

    def update_progress(
        self, job_id: str, worker: str, progress: dict[str, Any], history: list[dict[str, Any]]
    ) -> None:
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET progress = %s, history = %s"
                " WHERE id = %s AND state = %s AND lease_owner = %s RETURNING id",
                (json.dumps(progress), json.dumps(history), job_id, RUNNING, worker),
            ).fetchone()
        if row is None:
            raise LeaseLost(f"{worker} no longer holds job {job_id}")

    def _end_lease(
        self, conn: psycopg.Connection[dict[str, Any]], job_id: str, attempt: int
    ) -> None:
        conn.execute(
            "UPDATE job_leases SET ended_at = now() WHERE job_id = %s AND attempt = %s",
            (job_id, attempt),
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
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = %s, failure_reason = %s, result_version = %s,"
                f" end_time = {_EPOCH_NOW}, lease_owner = '', lease_expires = NULL,"
                " history = COALESCE(%s, history)"
                f" WHERE id = %s AND state = %s AND lease_owner = %s RETURNING {_JOB_COLUMNS}",
                (
                    state, reason, result_version,
                    None if history is None else json.dumps(history), job_id, RUNNING, worker,
                ),
            ).fetchone()  # fmt: skip
            if row is None:
                raise LeaseLost(f"{worker} no longer holds job {job_id}")
            self._end_lease(conn, job_id, row["attempts"])
        return _job(row)

    def release_job(self, job_id: str, worker: str) -> None:
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = %s, lease_owner = '', lease_expires = NULL"
                " WHERE id = %s AND state = %s AND lease_owner = %s RETURNING attempts",
                (QUEUED, job_id, RUNNING, worker),
            ).fetchone()
            if row is not None:
                self._end_lease(conn, job_id, row["attempts"])

    def cancel_job(self, job_id: str) -> JobRecord:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r}", "job_id")
            if row["state"] == QUEUED:
                conn.execute(
                    f"UPDATE jobs SET state = %s, end_time = {_EPOCH_NOW}, cancel_requested = true"
                    " WHERE id = %s",
                    (CANCELLED, job_id),
                )
            elif row["state"] == RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s", (job_id,))
            else:
                raise FailedPrecondition(f"job {job_id} already ended: {row['state']}")
            job = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
        return _job(job)  # type: ignore[arg-type]

    def recover(self) -> list[str]:
        """Nothing to do: a RUNNING job may belong to another live replica. Jobs of a dead
        replica become claimable when their lease expires."""
        return []

    # --- checkpoints --------------------------------------------------------------------
    def put_checkpoint(self, job_id: str, worker: str, data: bytes) -> None:
        owner = _checkpoint_owner(job_id)
        with self._tx() as conn:
            # The row lock keeps the job from being claimed away until this commits.
            if not conn.execute(
                "SELECT 1 FROM jobs WHERE id = %s AND state = %s AND lease_owner = %s"
                " FOR NO KEY UPDATE",
                (job_id, RUNNING, worker),
            ).fetchone():
                raise LeaseLost(f"{worker} no longer holds job {job_id}")
            conn.execute("DELETE FROM blobs WHERE owner = %s", (owner,))
            _insert_chunks(conn, owner, "", data)
            failpoint("checkpoint.partial")  # a crash here keeps the previous checkpoint
            conn.execute(
                "INSERT INTO checkpoints (job_id, worker, size_bytes, create_time)"
                f" VALUES (%s, %s, %s, {_EPOCH_NOW}) ON CONFLICT (job_id) DO UPDATE"
                " SET worker = excluded.worker, size_bytes = excluded.size_bytes,"
                " create_time = excluded.create_time",
                (job_id, worker, len(data)),
            )

    def get_checkpoint(self, job_id: str) -> bytes | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT size_bytes FROM checkpoints WHERE job_id = %s", (job_id,)
            ).fetchone()
            if row is None:
                return None
            data = _read_into(conn, _checkpoint_owner(job_id), "", row["size_bytes"])
        return data.tobytes()

    def delete_checkpoint(self, job_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM checkpoints WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM blobs WHERE owner = %s", (_checkpoint_owner(job_id),))

    # --- misc ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT (SELECT COUNT(*) FROM models) AS models,"
                " (SELECT COUNT(*) FROM versions) AS versions,"
                " (SELECT COUNT(*) FROM datasets) AS datasets,"
                " (SELECT COALESCE(SUM(octet_length(data)), 0) FROM blobs) AS bytes"
            ).fetchone()
            out = {k: int(v) for k, v in row.items()}  # type: ignore[union-attr]
            for r in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                out[f"jobs_{r['state']}"] = int(r["n"])
        return out

    def ping(self) -> bool:
        if self._closed.is_set():
            return False
        try:
            with self._pool.connection(timeout=PING_TIMEOUT) as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, PoolTimeout):
            return False

    def watch_versions(self) -> Iterator[tuple[str, int]]:
        """Versions committed by any replica (this one included), from LISTEN on a connection
        of its own; reconnects after a database restart. Notifications sent while
        disconnected are lost, so a consumer must treat this as a hint (the registry resolves
        "latest" against the store on every call anyway)."""
        while not self._closed.is_set():
            try:
                with self._connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._closed.is_set():
                        yield from self._parse_notifies(conn.notifies(timeout=1.0))
            except (Unavailable, psycopg.OperationalError) as e:
                log.warning("listening for new versions failed (%s); retrying", e)
                self._closed.wait(1.0)

    @staticmethod
    def _parse_notifies(notifies: Iterable[psycopg.Notify]) -> Iterator[tuple[str, int]]:
        for n in notifies:
            model_id, version = json.loads(n.payload)
            yield str(model_id), int(version)

    def close(self) -> None:
        self._closed.set()
        self._pool.close()
