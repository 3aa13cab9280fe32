"""The store: everything the server keeps, behind one interface with two implementations.

* ``SQLiteStore`` (embedded default): SQLite in WAL mode for metadata, files in the data dir
  for tensors (weights, checkpoints, datasets).
* ``PostgresStore`` (scale-out): metadata, job queue and tensors in one PostgreSQL, shared by
  several replicas.

Both pass the same test suite (tests/server/test_store.py). Jobs are *claimed*, never assigned:
a worker takes the oldest QUEUED job under a lease it renews while training; a job whose lease
expired (its worker died) can be claimed again and resumes from its checkpoint. Writes that
finish a job are fenced by the lease owner, so a worker that lost its lease cannot overwrite
the work of the one that took the job over.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING})


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class BatchingPolicy:
    """A model's own dynamic-batching settings; None takes the server's default. Stored as the
    JSON of ``to_dict`` (only the fields that are set), so a new field needs no migration."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    disabled: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchingPolicy:
        return cls(**{k: d[k] for k in BATCHING_FIELDS if k in d})

    def merge(self, new: BatchingPolicy, fields: Collection[str]) -> BatchingPolicy:
        """This policy with ``fields`` taken from ``new`` (None there: back to the default)."""
        return dataclasses.replace(self, **{f: getattr(new, f) for f in fields})


BATCHING_FIELDS = tuple(f.name for f in dataclasses.fields(BatchingPolicy))


@dataclass
class ModelRecord:
    id: str
    name: str
    spec: dict[str, Any]  # normalised spec
    seed: int
    parameter_count: int
    create_time: float
    versions: list[VersionRecord] = field(default_factory=list)
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)

    @property
    def latest_version(self) -> int:
        return self.versions[-1].version if self.versions else 0


@dataclass
class VersionRecord:
    model_id: str
    version: int
    create_time: float
    job_id: str
    source: str  # "train" or "import"
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DatasetRecord:
    id: str
    name: str
    sample_shape: tuple[int, ...]
    dtype: str  # "float32" or "uint8"
    num_classes: int
    sample_count: int
    size_bytes: int
    sha256: str
    create_time: float


@dataclass
class JobRecord:
    id: str
    model_id: str
    dataset_id: str
    state: str
    config: dict[str, Any]  # the training request, as a plain dict
    create_time: float
    seq: int = 0  # submission order
    progress: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    failure_reason: str = ""
    result_version: int = 0
    start_time: float | None = None
    end_time: float | None = None
    attempts: int = 0
    lease_owner: str = ""
    lease_expires: float = 0.0
    cancel_requested: bool = False


class LeaseLost(Exception):
    """The worker no longer holds the job's lease; it must stop without writing more."""


class DatasetWriter(abc.ABC):
    """Receives an upload's bytes as they arrive; nothing is visible until ``commit``."""

    @abc.abstractmethod
    def write_images(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def write_labels(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The received (images, labels), for validation before commit."""

    @abc.abstractmethod
    def commit(self, record: DatasetRecord) -> DatasetRecord:
        """Make the dataset visible (atomically); raises AlreadyExists on a taken name."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written so far."""


class Store(abc.ABC):
    """Persistent state of the service. Every method is safe to call from many threads."""

    # --- models -------------------------------------------------------------------------
    @abc.abstractmethod
    def create_model(self, record: ModelRecord) -> ModelRecord:
        """Insert; raises AlreadyExists when the name is taken."""

    @abc.abstractmethod
    def get_model(self, key: str) -> ModelRecord | None:
        """By id or by name, with its versions."""

    @abc.abstractmethod
    def list_models(self, limit: int, after: str = "") -> list[ModelRecord]:
        """In creation order, starting after the model with id ``after``."""

    @abc.abstractmethod
    def update_model_batching(
        self, model_id: str, batching: BatchingPolicy, fields: Collection[str]
    ) -> ModelRecord:
        """Set ``fields`` of the model's batching policy to their values in ``batching`` (None:
        back to the server's default) and keep the others, in one transaction, so concurrent
        updates of different fields both hold. Returns the model; NotFound when it is gone."""

    @abc.abstractmethod
    def delete_model(self, model_id: str) -> None:
        """Delete a model, its versions and their weights; FailedPrecondition while a job for
        it is QUEUED or RUNNING."""

    @abc.abstractmethod
    def add_version(
        self, model_id: str, weights: bytes, job_id: str, source: str, history: list[dict[str, Any]]
    ) -> VersionRecord:
        """Store weights (.npz bytes) as the model's next version, atomically: the version is
        visible only once its weights are complete."""

    @abc.abstractmethod
    def get_weights(self, model_id: str, version: int) -> bytes:
        """The .npz bytes of a version; NotFound when it does not exist."""

    # --- datasets -----------------------------------------------------------------------
    @abc.abstractmethod
    def dataset_writer(self, max_bytes: int) -> AbstractContextManager[DatasetWriter]:
        """A writer for one upload; leaving the context without commit aborts it."""

    @abc.abstractmethod
    def get_dataset(self, key: str) -> DatasetRecord | None: ...

    @abc.abstractmethod
    def list_datasets(self, limit: int, after: str = "") -> list[DatasetRecord]: ...

    @abc.abstractmethod
    def delete_dataset(self, dataset_id: str) -> None:
        """FailedPrecondition while a QUEUED or RUNNING job uses it."""

    @abc.abstractmethod
    def load_dataset(self, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, C, H, W) of the dataset's dtype, labels (N,) int32), read-only."""

    # --- jobs ---------------------------------------------------------------------------
    @abc.abstractmethod
    def create_job(self, record: JobRecord, max_queued: int) -> JobRecord:
        """Insert a QUEUED job; ResourceExhausted when ``max_queued`` jobs already wait."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def list_jobs(
        self, limit: int, after: str = "", model_id: str = "", state: str = ""
    ) -> list[JobRecord]: ...

    @abc.abstractmethod
    def queue_position(self, job_id: str) -> int:
        """1 for the next QUEUED job to run, 0 when the job is not QUEUED."""

    @abc.abstractmethod
    def claim_job(self, worker: str, lease_seconds: float) -> JobRecord | None:
        """Atomically take the oldest claimable job: QUEUED, or RUNNING with an expired lease
        (its worker died). Marks it RUNNING under ``worker``'s lease and counts an attempt."""

    @abc.abstractmethod
    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend the lease; False when ``worker`` no longer holds it."""

    @abc.abstractmethod
    def update_progress(
        self, job_id: str, worker: str, progress: dict[str, Any], history: list[dict[str, Any]]
    ) -> None:
        """Record progress; raises LeaseLost when ``worker`` no longer holds the lease."""

    @abc.abstractmethod
    def finish_job(
        self,
        job_id: str,
        worker: str,
        state: str,
        reason: str = "",
        result_version: int = 0,
        history: list[dict[str, Any]] | None = None,
    ) -> JobRecord:
        """Move a RUNNING job to a terminal state; raises LeaseLost when not the holder."""

    @abc.abstractmethod
    def release_job(self, job_id: str, worker: str) -> None:
        """Put a RUNNING job back to QUEUED (the server is draining); it keeps its order."""

    @abc.abstractmethod
    def cancel_job(self, job_id: str) -> JobRecord:
        """QUEUED -> CANCELLED at once; RUNNING -> cancel requested (the worker stops it)."""

    @abc.abstractmethod
    def recover(self) -> list[str]:
        """At start-up of a single-node store: every RUNNING job lost its worker with the
        previous process; make them claimable now. Returns their ids."""

    # --- checkpoints --------------------------------------------------------------------
    @abc.abstractmethod
    def put_checkpoint(self, job_id: str, worker: str, data: bytes) -> None:
        """Replace the job's checkpoint atomically; LeaseLost when not the lease holder."""

    @abc.abstractmethod
    def get_checkpoint(self, job_id: str) -> bytes | None: ...

    @abc.abstractmethod
    def delete_checkpoint(self, job_id: str) -> None: ...

    # --- misc ---------------------------------------------------------------------------
    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counts for metrics: models, versions, datasets, jobs_<state>, bytes."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store answers (readiness)."""

    def watch_versions(self) -> Iterator[tuple[str, int]]:
        """New versions made by other replicas, as (model_id, version); none for one node."""
        return iter(())

    @abc.abstractmethod
    def close(self) -> None: ...
