"""The Client: a context manager that owns one gRPC channel to a cnnd server."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnd.client._convert import DTYPE_ENUMS, encode_tensor, spec_to_proto
from cnnd.client._errors import (
    CnndError,
    DeadlineExceeded,
    InvalidArgument,
    JobFailed,
    Unavailable,
    from_rpc_error,
    from_status,
)
from cnnd.client._progress import JobProgress, byte_bar
from cnnd.client._types import (
    JOB_STATES,
    Batching,
    Dataset,
    InferResult,
    Inspection,
    Job,
    JobEvent,
    Model,
)
from cnnd.v1 import (
    datasets_pb2,
    inference_pb2,
    jobs_pb2,
    models_pb2,
    service_pb2_grpc,
)

SERVICE = "cnnd.v1.CnndService"
DEFAULT_TARGET = "127.0.0.1:50051"
CHUNK_BYTES = 1 << 20
# Calls that change nothing, retried on UNAVAILABLE with exponential backoff.
IDEMPOTENT = (
    "GetModel", "ListModels", "GetDataset", "ListDatasets", "GetJob", "ListJobs", "WatchJob",
    "Infer", "Inspect", "ExportModel",
)  # fmt: skip

# Batching's fields as UpdateModel's update_mask names them.
BATCHING_PATHS = {
    "max_batch_size": "batching.max_batch_size",
    "max_queue_delay_us": "batching.max_queue_delay_us",
    "enabled": "batching.disabled",
}

ModelRef = Model | str
DatasetRef = Dataset | str
JobRef = Job | str


@dataclass(frozen=True)
class TLS:
    """TLS settings: ``ca`` verifies the server (system roots when None); ``cert`` and ``key``
    authenticate this client for mutual TLS; ``server_name`` overrides the name checked."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _service_config(retries: int) -> str:
    if retries <= 0:
        return json.dumps({})
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT],
                    "retryPolicy": {
                        "maxAttempts": min(retries + 1, 5),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "3s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _key(ref: Any, kind: type, what: str) -> str:
    if isinstance(ref, kind):
        return ref.id  # type: ignore[attr-defined]
    if isinstance(ref, str) and ref:
        return ref
    raise TypeError(f"{what} must be a {kind.__name__} or an id/name string, got {ref!r}")


class Client:
    """A connection to a cnnd server.

    >>> with Client("127.0.0.1:50051") as c:
    ...     model = c.create_model(spec, name="lenet")
    ...     job = c.train(model, c.upload_dataset(x, y, name="digits"), epochs=5)
    ...     job.wait()
    ...     c.infer(model, x[:8]).classes

    ``target`` defaults to $CNND_TARGET, then 127.0.0.1:50051. ``token`` (default
    $CNND_TOKEN) is sent as ``authorization: Bearer <token>``; ``tls`` is True (system roots)
    or a TLS(...) for a private CA and mutual TLS; ``timeout`` is the default deadline of every
    unary call in seconds (streams of job events have none). Calls that change nothing (get,
    list, watch, infer, inspect, export) are retried on UNAVAILABLE up to ``retries`` times
    (at most 4) with jittered exponential backoff from 0.2 s; calls that create, change or
    delete something are never retried, so a lost reply cannot make them happen twice.
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        tls: bool | TLS | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.target = target or os.environ.get("CNND_TARGET") or DEFAULT_TARGET
        token = token if token is not None else os.environ.get("CNND_TOKEN")
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", _service_config(retries)),
            ("grpc.enable_retries", 1 if retries > 0 else 0),
            ("grpc.keepalive_time_ms", 60_000),
        ]
        if tls:
            settings = tls if isinstance(tls, TLS) else TLS()
            if settings.server_name:
                options.append(("grpc.ssl_target_name_override", settings.server_name))
            self.channel = grpc.secure_channel(self.target, settings.credentials(), options)
        else:
            self.channel = grpc.insecure_channel(self.target, options)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.stub = service_pb2_grpc.CnndServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # --- plumbing -----------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(
                request, timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    @staticmethod
    def _guarded(requests: Iterable[Any], failure: list[BaseException]) -> Iterator[Any]:
        """Requests of a client-streaming call. gRPC swallows an exception raised while it
        pulls requests (the call fails as "Exception iterating requests!"); this ends the
        stream cleanly instead and keeps the exception in ``failure`` for the caller."""
        try:
            yield from requests
        except Exception as e:
            failure.append(e)

    # --- health -------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = None) -> str:
        """ "SERVING" or "NOT_SERVING" (health is open even where the API needs a token)."""
        try:
            r = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until health is SERVING; Unavailable after ``timeout`` seconds (each check
        gets only the time that is left, so a server that never answers cannot hold it up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self.health(timeout=max(left, 0.05)) == "SERVING":
                    return
                last = None
            except CnndError as e:
                last = e
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        why = f" ({last})" if last else " (it answers NOT_SERVING)"
        raise Unavailable(f"{self.target} was not SERVING after {timeout:g} s{why}")

    # --- models -------------------------------------------------------------------------
    def create_model(
        self, spec: dict[str, Any], name: str, seed: int = 0, batching: Batching | None = None
    ) -> Model:
        """Create a model from a spec dict (see cnnd.core.spec): ``{"input_shape": [C, H, W],
        "layers": [{"type": "conv2d", ...}, ...]}``, ending in flatten and linear. Its initial
        weights are drawn from ``seed``; it has no trained version yet (latest_version 0).
        ``batching`` sets how its Infer calls are batched (default: the server's settings).
        Never retried (a retry after a lost reply would fail with AlreadyExists)."""
        try:
            proto = spec_to_proto(spec)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"spec: {e}") from None
        req = models_pb2.CreateModelRequest(
            name=name, spec=proto, seed=seed, batching=(batching or Batching()).to_proto()
        )
        return Model.from_proto(self._call("CreateModel", req).model)

    def update_model(
        self, model: ModelRef, *, batching: Batching, fields: Iterable[str] | None = None
    ) -> Model:
        """Change how a model's Infer calls are batched, without recreating it; returns the
        model. ``fields`` names the fields of ``batching`` that change ("max_batch_size",
        "max_queue_delay_us", "enabled"), the others keep their values; None changes all of
        them, so the policy becomes ``batching`` (None fields: the server's defaults). Calls
        use it from the next one on (on other replicas within 0.25 s). Never retried."""
        names = list(BATCHING_PATHS) if fields is None else list(fields)
        unknown = [f for f in names if f not in BATCHING_PATHS]
        if unknown or not names:  # an empty mask would mean "the fields that are set"
            raise InvalidArgument(f"fields must name some of {list(BATCHING_PATHS)}: {names}")
        req = models_pb2.UpdateModelRequest(
            model_id=_key(model, Model, "model"), batching=batching.to_proto()
        )
        req.update_mask.paths.extend(
            ["batching"] if fields is None else [BATCHING_PATHS[f] for f in names]
        )
        return Model.from_proto(self._call("UpdateModel", req).model)

    def get_model(self, model: ModelRef) -> Model:
        """A model (a Model, or an id or name), with its versions and their training history."""
        req = models_pb2.GetModelRequest(model_id=_key(model, Model, "model"))
        return Model.from_proto(self._call("GetModel", req).model)

    def list_models(self) -> list[Model]:
        """Every model, oldest first (all pages)."""
        out: list[Model] = []
        token = ""
        while True:
            r = self._call("ListModels", models_pb2.ListModelsRequest(page_token=token))
            out += [Model.from_proto(m) for m in r.models]
            if not (token := r.next_page_token):
                return out

    def delete_model(self, model: ModelRef) -> None:
        """Delete a model with all its versions; NotFound when there is no such model."""
        req = models_pb2.DeleteModelRequest(model_id=_key(model, Model, "model"))
        self._call("DeleteModel", req)

    def export_model(
        self, model: ModelRef, path: str | os.PathLike[str], version: int | None = None
    ) -> Path:
        """Write a version (default: the latest; a model never trained has its initial
        weights) as .npz to ``path``: PyTorch state_dict names ("0.weight" (out, in, kh, kw),
        ...) plus ``__spec__``, the spec as JSON. The file is replaced atomically."""
        req = models_pb2.ExportModelRequest(
            model_id=_key(model, Model, "model"), version=version or 0
        )
        data = b"".join(r.chunk for r in self._stream("ExportModel", req, self.timeout))
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def import_model(
        self, path: str | os.PathLike[str], name: str, batching: Batching | None = None
    ) -> Model:
        """Create a model named ``name`` from a .npz written by ``export_model`` (or any
        archive with the same state_dict names and ``__spec__``); its weights become
        version 1. ``batching`` as in ``create_model``. Never retried."""
        data = Path(path).read_bytes()

        def requests() -> Iterator[models_pb2.ImportModelRequest]:
            header = models_pb2.ImportModelHeader(
                name=name, size_bytes=len(data), batching=(batching or Batching()).to_proto()
            )
            yield models_pb2.ImportModelRequest(header=header)
            for lo in range(0, len(data), CHUNK_BYTES):
                yield models_pb2.ImportModelRequest(chunk=data[lo : lo + CHUNK_BYTES])

        return Model.from_proto(self._call("ImportModel", requests()).model)

    # --- datasets -----------------------------------------------------------------------
    def upload_dataset(
        self,
        x: np.ndarray,
        y: np.ndarray,
        name: str,
        num_classes: int | None = None,
        progress: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> Dataset:
        """Upload images x (N, C, H, W), or (N, H, W) for one channel, as float32 (other
        float or int types are converted) or uint8 (scaled to [0, 1] for training), and
        integer labels y (N,) in [0, num_classes) (default: max(y) + 1), streamed in chunks
        with a SHA-256 the server checks. ``progress`` draws a byte progress bar on stderr
        when it is a terminal, one summary line when it is not. Never retried."""
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise InvalidArgument(f"x must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
        if x.dtype != np.uint8:
            x = x.astype("<f4", copy=False)
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise InvalidArgument(f"y must be {x.shape[0]} integer labels, got {y.shape} {y.dtype}")
        images = np.ascontiguousarray(x).tobytes()
        labels = y.astype("<i4").tobytes()
        digest = hashlib.sha256(images)
        digest.update(labels)
        header = datasets_pb2.DatasetHeader(
            name=name, sample_shape=list(x.shape[1:]), dtype=DTYPE_ENUMS[x.dtype.name],
            num_classes=int(num_classes or (int(y.max()) + 1 if len(y) else 0)),
            sample_count=x.shape[0], sha256=digest.hexdigest(),
        )  # fmt: skip
        bar = byte_bar(len(images) + len(labels), f"upload {name}", progress)

        def requests() -> Iterator[datasets_pb2.UploadDatasetRequest]:
            yield datasets_pb2.UploadDatasetRequest(header=header)
            for field, data in (("images", images), ("labels", labels)):
                for lo in range(0, len(data), chunk_bytes):
                    chunk = data[lo : lo + chunk_bytes]
                    if bar is not None:
                        bar.update(len(chunk))
                    yield datasets_pb2.UploadDatasetRequest(**{field: chunk})

        try:
            timeout = self.timeout + len(images) / 10e6  # at least 10 MB/s
            return Dataset.from_proto(self._call("UploadDataset", requests(), timeout).dataset)
        finally:
            if bar is not None:
                bar.close()

    def get_dataset(self, dataset: DatasetRef) -> Dataset:
        """A dataset (a Dataset, or an id or name)."""
        req = datasets_pb2.GetDatasetRequest(dataset_id=_key(dataset, Dataset, "dataset"))
        return Dataset.from_proto(self._call("GetDataset", req).dataset)

    def list_datasets(self) -> list[Dataset]:
        """Every dataset, oldest first (all pages)."""
        out: list[Dataset] = []
        token = ""
        while True:
            r = self._call("ListDatasets", datasets_pb2.ListDatasetsRequest(page_token=token))
            out += [Dataset.from_proto(d) for d in r.datasets]
            if not (token := r.next_page_token):
                return out

    def delete_dataset(self, dataset: DatasetRef) -> None:
        """Delete a dataset; NotFound when there is no such dataset."""
        req = datasets_pb2.DeleteDatasetRequest(dataset_id=_key(dataset, Dataset, "dataset"))
        self._call("DeleteDataset", req)

    # --- training -----------------------------------------------------------------------
    def train(
        self,
        model: ModelRef,
        dataset: DatasetRef,
        epochs: int = 10,
        batch_size: int = 32,
        optimizer: str = "sgd",
        lr: float | None = None,
        momentum: float = 0.0,
        weight_decay: float | None = None,
        nesterov: bool = False,
        validation: DatasetRef | float | None = None,
        seed: int = 0,
        checkpoint_every: int = 1,
        patience: int | None = None,
        schedule: str | dict[str, Any] | None = None,
        initial_version: int = 0,
    ) -> Job:
        """Start a training job and return it at once (QUEUED or RUNNING).

        ``optimizer`` is "sgd", "adam" or "adamw" with PyTorch's rules (``lr`` defaults to
        0.01 for SGD, 1e-3 otherwise; ``momentum`` and ``nesterov`` are SGD's); ``validation``
        is a dataset (object, id or name) or a fraction in (0, 1) held out per class;
        ``schedule`` is "step" / "cosine" or a dict such as {"kind": "step", "step_size": 5,
        "gamma": 0.5} or {"kind": "cosine", "t_max": 10, "eta_min": 0.0}; ``patience`` stops
        after that many epochs without a lower validation loss; ``initial_version`` starts
        from a trained version's weights instead of the model's initial ones. The finished
        job's weights become the model's next version. Never retried.
        """
        req = jobs_pb2.TrainRequest(
            model_id=_key(model, Model, "model"), dataset_id=_key(dataset, Dataset, "dataset"),
            epochs=epochs, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
            early_stopping_patience=patience or 0, initial_version=initial_version,
        )  # fmt: skip
        if isinstance(validation, float | int) and not isinstance(validation, bool):
            req.validation_fraction = float(validation)
        elif validation is not None:
            req.validation_dataset_id = _key(validation, Dataset, "validation")
        if optimizer == "sgd":
            req.sgd.CopyFrom(
                jobs_pb2.Sgd(
                    lr=lr or 0.0, momentum=momentum, weight_decay=weight_decay or 0.0,
                    nesterov=nesterov,
                )
            )  # fmt: skip
        elif optimizer in ("adam", "adamw"):
            msg = getattr(req, optimizer)
            msg.lr = lr or 0.0
            if weight_decay is not None:
                msg.weight_decay = weight_decay
        else:
            raise InvalidArgument(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if schedule is not None:
            s = {"kind": schedule} if isinstance(schedule, str) else dict(schedule)
            kind = s.pop("kind", None)
            try:
                if kind == "step":
                    req.schedule.step.CopyFrom(jobs_pb2.StepLr(**s))
                elif kind == "cosine":
                    req.schedule.cosine.CopyFrom(jobs_pb2.CosineLr(**s))
                elif kind not in (None, "constant") or s:
                    raise ValueError("kind must be 'constant', 'step' or 'cosine'")
            except (ValueError, TypeError) as e:
                raise InvalidArgument(f"schedule {schedule!r}: {e}") from None
        return Job.from_proto(self._call("Train", req).job, self)

    def get_job(self, job: JobRef) -> Job:
        """A job (a Job or its id) as the server has it now: state, progress, history."""
        req = jobs_pb2.GetJobRequest(job_id=_key(job, Job, "job"))
        return Job.from_proto(self._call("GetJob", req).job, self)

    def list_jobs(self, model: ModelRef | None = None, state: str | None = None) -> list[Job]:
        """Jobs, oldest first (all pages); only ``model``'s, or only those in ``state``
        ("queued", "running", "succeeded", "failed" or "cancelled"), when given."""
        out: list[Job] = []
        token = ""
        model_id = _key(model, Model, "model") if model is not None else ""
        state_enum = 0
        if state:
            if state.upper() not in JOB_STATES:
                choices = ", ".join(JOB_STATES).lower()
                raise InvalidArgument(f"state must be one of {choices}; got {state!r}")
            state_enum = jobs_pb2.JobState.Value(f"JOB_STATE_{state.upper()}")
        while True:
            req = jobs_pb2.ListJobsRequest(page_token=token, model_id=model_id, state=state_enum)
            r = self._call("ListJobs", req)
            out += [Job.from_proto(j, self) for j in r.jobs]
            if not (token := r.next_page_token):
                return out

    def cancel_job(self, job: JobRef) -> Job:
        """Ask a QUEUED or RUNNING job to stop (at its next step); FailedPrecondition when it
        already ended. Returns the job; ``wait()`` on it to see it CANCELLED."""
        req = jobs_pb2.CancelJobRequest(job_id=_key(job, Job, "job"))
        return Job.from_proto(self._call("CancelJob", req).job, self)

    def watch_job(self, job: JobRef, timeout: float | None = None) -> Iterator[JobEvent]:
        """Events of a job until it ends: a snapshot first, then state changes, progress (at
        most every 200 ms) and each epoch's metrics. No deadline unless ``timeout`` is given
        (then DeadlineExceeded once it passes)."""
        req = jobs_pb2.WatchJobRequest(job_id=_key(job, Job, "job"))
        for ev in self._stream("WatchJob", req, timeout):
            yield JobEvent.from_proto(ev, self)

    def wait_job(
        self,
        job: JobRef,
        progress: bool = True,
        timeout: float | None = None,
        raise_on_failure: bool = False,
    ) -> Job:
        """Block until the job ends; return the final Job. ``progress`` draws a live bar on a
        terminal (stderr), one line per epoch elsewhere. A server that restarts or is briefly
        unreachable is waited for (Unavailable once it has been unreachable for the client's
        ``timeout``). TimeoutError after ``timeout`` seconds; JobFailed when the job ends
        FAILED or CANCELLED and ``raise_on_failure``."""
        job_id = _key(job, Job, "job")
        deadline = None if timeout is None else time.monotonic() + timeout
        display = JobProgress() if progress else None
        backoff = 0.2
        unreachable_since: float | None = None
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.01)
                news = False
                try:
                    try:
                        for ev in self.watch_job(job_id, left):
                            if display is not None:
                                display.update(ev)
                            news = news or ev.kind != "snapshot"
                    except DeadlineExceeded:
                        pass  # our own deadline: the job's state decides below
                    final = self.get_job(job_id)
                    unreachable_since = None
                except Unavailable:
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > self.timeout:
                        raise
                    final = None
                if final is not None and final.done:
                    if display is not None:
                        display.finish(final)
                    if raise_on_failure and final.state != "SUCCEEDED":
                        raise JobFailed(f"job {final.id} {final.state}: {final.failure_reason}")
                    return final
                if deadline is not None and time.monotonic() >= deadline:
                    state = final.state if final is not None else "unknown (server unreachable)"
                    raise TimeoutError(f"job {job_id} is still {state} after {timeout} s")
                # The stream ended early (the server restarts or drains): back off unless it
                # brought news, so a draining server is not asked in a tight loop.
                if news:
                    backoff = 0.2
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                time.sleep(backoff if left is None else max(min(backoff, left), 0.0))
                backoff = min(backoff * 2, 5.0)
        finally:
            if display is not None:
                display.close()

    # --- inference ----------------------------------------------------------------------
    def infer(self, model: ModelRef, x: np.ndarray, version: int | None = None) -> InferResult:
        """Classify x (N, C, H, W), or one sample (C, H, W), float32 or uint8, with the model's
        ``version`` (default: the latest; FailedPrecondition if it was never trained). The
        result holds logits and probabilities (N, classes) and classes (N,); N is 1 for one
        sample."""
        req = self._infer_request(model, x, version)
        return InferResult.from_proto(self._call("Infer", req))

    @staticmethod
    def _infer_request(
        model: ModelRef, x: np.ndarray, version: int | None, request_id: str = ""
    ) -> inference_pb2.InferRequest:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        try:
            tensor = encode_tensor(x)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"input must be numbers, got {x.dtype}: {e}") from None
        return inference_pb2.InferRequest(
            model_id=_key(model, Model, "model"), version=version or 0,
            input=tensor, request_id=request_id,
        )  # fmt: skip

    def infer_stream(
        self, model: ModelRef, inputs: Iterable[np.ndarray], version: int | None = None
    ) -> Iterator[InferResult | CnndError]:
        """Many inputs (each (N, C, H, W) or (C, H, W)) over one bidirectional stream, sent
        as ``inputs`` yields them; results in order. An input the server refuses yields its
        CnndError in its place and the stream goes on; an exception raised while producing
        the requests (by ``inputs`` itself, or InvalidArgument for an input that is not
        numbers) is raised after the results of the inputs before it."""
        key = _key(model, Model, "model")
        requests = (
            inference_pb2.InferStreamRequest(request=self._infer_request(key, x, version, str(i)))
            for i, x in enumerate(inputs)
        )
        failure: list[BaseException] = []
        for r in self._stream("InferStream", self._guarded(requests, failure)):
            if r.error.code:
                yield from_status(r.error.code, r.error.message)
            else:
                yield InferResult.from_proto(r.response)
        if failure:
            raise failure[0]

    def inspect(
        self,
        model: ModelRef,
        version: int | None = None,
        input: np.ndarray | None = None,
        target_class: int | None = None,
        include_weights: bool = False,
    ) -> Inspection:
        """Layers, parameter statistics and training history of a version (default: the
        latest, or the initial weights of a model never trained); its weights (state_dict
        names and shapes) too with ``include_weights``. With
        ``input`` (one sample, (C, H, W) or (1, C, H, W)) also every layer's feature maps
        (1, ...) keyed "3.conv2d", the logits (1, classes) and the saliency map dL/dx
        (1, C, H, W) of ``target_class`` (default: the predicted class)."""
        req = inference_pb2.InspectRequest(
            model_id=_key(model, Model, "model"), version=version or 0,
            include_weights=include_weights,
        )  # fmt: skip
        if input is not None:
            x = np.asarray(input)
            try:
                req.input.CopyFrom(encode_tensor(x[None] if x.ndim == 3 else x))
            except (ValueError, TypeError) as e:
                raise InvalidArgument(f"input must be numbers, got {x.dtype}: {e}") from None
        if target_class is not None:
            req.target_class = target_class
        return Inspection.from_proto(self._call("Inspect", req))
