"""Plain result types of the SDK; they hide protobuf from the caller."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cnnd.client._convert import DTYPE_NAMES, decode_tensor, spec_from_proto
from cnnd.v1 import datasets_pb2, inference_pb2, jobs_pb2, models_pb2

if TYPE_CHECKING:
    from cnnd.client._client import Client

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


def message_dict(msg: Message) -> dict[str, Any]:
    """The fields of a message that are set, as plain Python values: int64 stays an int and
    enums become their names (json_format would make int64 strings)."""
    out: dict[str, Any] = {}

    def plain(fd: Any, v: Any) -> Any:
        if isinstance(v, Message):
            return message_dict(v)
        if fd.enum_type is not None:
            value = fd.enum_type.values_by_number.get(v)
            return value.name if value is not None else v
        return v

    for fd, value in msg.ListFields():
        if isinstance(value, Message | str | bytes | int | float):
            out[fd.name] = plain(fd, value)
        else:  # a repeated field
            out[fd.name] = [plain(fd, v) for v in value]
    return out


def _time(ts: Timestamp, present: bool = True) -> datetime | None:
    if not present:
        return None
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, tz=UTC)


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float
    seconds: float

    @classmethod
    def from_proto(cls, m: models_pb2.EpochMetrics) -> EpochMetrics:
        return cls(
            epoch=m.epoch,
            loss=m.loss,
            accuracy=m.accuracy,
            val_loss=m.val_loss if m.HasField("val_loss") else None,
            val_accuracy=m.val_accuracy if m.HasField("val_accuracy") else None,
            learning_rate=m.learning_rate,
            seconds=m.seconds,
        )


@dataclass(frozen=True)
class ModelVersion:
    version: int
    created: datetime | None
    job_id: str
    source: str
    history: list[EpochMetrics]

    @classmethod
    def from_proto(cls, v: models_pb2.ModelVersion) -> ModelVersion:
        return cls(
            v.version,
            _time(v.create_time, v.HasField("create_time")),
            v.job_id,
            v.source,
            [EpochMetrics.from_proto(e) for e in v.history],
        )


@dataclass(frozen=True)
class Batching:
    """How the server batches a model's Infer calls, as Triton's model configuration sets it:
    calls that arrive together run as one forward pass of at most ``max_batch_size`` samples,
    which waits up to ``max_queue_delay_us`` microseconds for more calls (only while more are
    on their way). None takes the server's default (``--batching-max-batch-size``,
    ``--batching-max-queue-delay-us``); ``enabled=False`` runs each call alone."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    enabled: bool = True

    def to_proto(self) -> models_pb2.BatchingPolicy:
        p = models_pb2.BatchingPolicy(
            max_batch_size=self.max_batch_size, max_queue_delay_us=self.max_queue_delay_us
        )
        if not self.enabled:  # enabled is the default: sent only when it is not
            p.disabled = True
        return p

    @classmethod
    def from_proto(cls, p: models_pb2.BatchingPolicy) -> Batching:
        return cls(
            max_batch_size=p.max_batch_size if p.HasField("max_batch_size") else None,
            max_queue_delay_us=p.max_queue_delay_us if p.HasField("max_queue_delay_us") else None,
            enabled=not p.disabled,
        )


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    spec: dict[str, Any]
    parameter_count: int
    versions: list[ModelVersion]
    latest_version: int
    seed: int
    created: datetime | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    batching: Batching = Batching()  # the model's own settings; None fields: server defaults

    @classmethod
    def from_proto(cls, m: models_pb2.Model) -> Model:
        return cls(
            id=m.id,
            name=m.name,
            spec=spec_from_proto(m.spec),
            parameter_count=m.parameter_count,
            versions=[ModelVersion.from_proto(v) for v in m.versions],
            latest_version=m.latest_version,
            seed=m.seed,
            created=_time(m.create_time, m.HasField("create_time")),
            input_shape=tuple(m.spec.input_shape),
            output_shape=tuple(m.output_shape),
            macs=m.macs,
            batching=Batching.from_proto(m.batching),
        )


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    sample_shape: tuple[int, ...]
    dtype: str
    num_classes: int
    sample_count: int
    size_bytes: int
    sha256: str
    created: datetime | None

    @classmethod
    def from_proto(cls, d: datasets_pb2.Dataset) -> Dataset:
        return cls(
            id=d.id,
            name=d.name,
            sample_shape=tuple(d.sample_shape),
            dtype=DTYPE_NAMES.get(d.dtype, "unknown"),
            num_classes=d.num_classes,
            sample_count=d.sample_count,
            size_bytes=d.size_bytes,
            sha256=d.sha256,
            created=_time(d.create_time, d.HasField("create_time")),
        )


@dataclass(frozen=True)
class Progress:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    samples_per_second: float
    eta_seconds: float
    learning_rate: float

    @classmethod
    def from_proto(cls, p: jobs_pb2.JobProgress) -> Progress:
        return cls(
            p.epoch,
            p.epochs,
            p.step,
            p.steps,
            p.loss,
            p.accuracy,
            p.samples_per_second,
            p.eta_seconds,
            p.learning_rate,
        )


@dataclass
class Job:
    """A training job. ``state`` is "QUEUED", "RUNNING", "SUCCEEDED", "FAILED" or "CANCELLED".

    ``events()`` streams its progress, ``wait()`` blocks until it ends (with a progress bar),
    ``cancel()`` stops it, ``refresh()`` fetches its current state.
    """

    id: str
    model_id: str
    dataset_id: str
    state: str
    progress: Progress
    history: list[EpochMetrics]
    failure_reason: str
    result_version: int
    attempts: int
    queue_position: int
    created: datetime | None
    started: datetime | None
    ended: datetime | None
    config: dict[str, Any] = field(default_factory=dict)  # the TrainRequest's fields that are set
    _client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, j: jobs_pb2.Job, client: Client | None = None) -> Job:
        return cls(
            id=j.id,
            model_id=j.model_id,
            dataset_id=j.dataset_id,
            state=jobs_pb2.JobState.Name(j.state).removeprefix("JOB_STATE_"),
            progress=Progress.from_proto(j.progress),
            history=[EpochMetrics.from_proto(e) for e in j.history],
            failure_reason=j.failure_reason,
            result_version=j.result_version,
            attempts=j.attempts,
            queue_position=j.queue_position,
            created=_time(j.create_time, j.HasField("create_time")),
            started=_time(j.start_time, j.HasField("start_time")),
            ended=_time(j.end_time, j.HasField("end_time")),
            config=message_dict(j.request),
            _client=client,
        )

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def _need_client(self) -> Client:
        if self._client is None:
            raise RuntimeError("this Job is not bound to a Client")
        return self._client

    def refresh(self) -> Job:
        """The job as the server has it now."""
        return self._need_client().get_job(self.id)

    def events(self) -> Iterator[JobEvent]:
        """Progress events until the job ends (a snapshot first)."""
        return self._need_client().watch_job(self.id)

    def wait(
        self, progress: bool = True, timeout: float | None = None, raise_on_failure: bool = False
    ) -> Job:
        """Block until the job ends; return the final job. ``progress`` shows a live bar with
        loss and accuracy on a terminal, one line per epoch elsewhere."""
        return self._need_client().wait_job(self.id, progress, timeout, raise_on_failure)

    def cancel(self) -> Job:
        return self._need_client().cancel_job(self.id)


@dataclass(frozen=True)
class JobEvent:
    """kind: "snapshot", "state", "progress" or "epoch"; ``job`` is the job as of the event."""

    kind: str
    job: Job
    epoch: EpochMetrics | None
    time: datetime | None

    @classmethod
    def from_proto(cls, e: jobs_pb2.WatchJobResponse, client: Client | None = None) -> JobEvent:
        kind = jobs_pb2.WatchJobResponse.Kind.Name(e.kind).removeprefix("KIND_").lower()
        return cls(
            kind=kind,
            job=Job.from_proto(e.job, client),
            epoch=EpochMetrics.from_proto(e.epoch) if e.HasField("epoch") else None,
            time=_time(e.time, e.HasField("time")),
        )


@dataclass(frozen=True)
class InferResult:
    """logits and probabilities (N, classes) float32; classes (N,) int64, the top-1 class."""

    model_id: str
    version: int
    logits: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray
    request_id: str = ""

    @classmethod
    def from_proto(cls, r: inference_pb2.InferResponse) -> InferResult:
        return cls(
            model_id=r.model_id,
            version=r.version,
            logits=decode_tensor(r.logits),
            probabilities=decode_tensor(r.probabilities),
            classes=np.array(r.classes, dtype=np.int64),
            request_id=r.request_id,
        )


@dataclass(frozen=True)
class LayerSummary:
    index: int
    type: str
    output_shape: tuple[int, ...]
    parameters: int
    macs: int
    receptive_field: tuple[int, ...]  # (height, width); empty once flat
    jump: tuple[int, ...]


@dataclass(frozen=True)
class ParameterStats:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    l2_norm: float


@dataclass(frozen=True)
class Inspection:
    """What Inspect tells about a model version. ``feature_maps`` (every layer's output for
    the input, keyed "3.conv2d"), ``saliency`` (dL/dx of ``target_class``, shape of the input)
    and ``logits`` are present only when an input was given; ``weights`` only on request."""

    model: Model
    version: int
    layers: list[LayerSummary]
    parameters: list[ParameterStats]
    history: dict[int, list[EpochMetrics]]
    weights: dict[str, np.ndarray]
    feature_maps: dict[str, np.ndarray]
    saliency: np.ndarray | None
    logits: np.ndarray | None
    target_class: int | None

    @classmethod
    def from_proto(cls, r: inference_pb2.InspectResponse) -> Inspection:
        model = Model.from_proto(r.model)
        has_input = r.HasField("saliency")
        return cls(
            model=model,
            version=r.version,
            layers=[
                LayerSummary(
                    l.index,
                    l.type,
                    tuple(l.output_shape),
                    l.parameters,
                    l.macs,
                    tuple(l.receptive_field),
                    tuple(l.jump),
                )
                for l in r.layers
            ],
            parameters=[
                ParameterStats(p.name, tuple(p.shape), p.mean, p.std, p.min, p.max, p.l2_norm)
                for p in r.parameters
            ],
            history={v.version: v.history for v in model.versions},
            weights={w.name: decode_tensor(w.tensor) for w in r.weights},
            feature_maps={f.name: decode_tensor(f.tensor) for f in r.feature_maps},
            saliency=decode_tensor(r.saliency) if has_input else None,
            logits=decode_tensor(r.logits) if has_input else None,
            target_class=r.target_class if has_input else None,
        )
