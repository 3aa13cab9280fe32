"""Conversions between protobuf messages and the engine's / store's plain types.

Decoding validates as it goes: every size is checked with Python ints before an array is
allocated, and every problem becomes an InvalidArgument naming the request field.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from cnnd.client import _convert
from cnnd.client._convert import (  # encode_tensor: re-exported for the handlers
    DTYPE_ENUMS,
    DTYPE_NAMES,
    DTYPES,
    encode_tensor,  # noqa: F401
    fill_tensor,
    spec_to_proto,
)
from cnnd.core.kernels import softmax
from cnnd.server.errors import InvalidArgument
from cnnd.server.store.base import DatasetRecord, JobRecord, ModelRecord, VersionRecord
from cnnd.v1 import datasets_pb2, inference_pb2, jobs_pb2, models_pb2, tensor_pb2

JOB_STATES = {
    "QUEUED": jobs_pb2.JOB_STATE_QUEUED,
    "RUNNING": jobs_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": jobs_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": jobs_pb2.JOB_STATE_FAILED,
    "CANCELLED": jobs_pb2.JOB_STATE_CANCELLED,
}
JOB_STATE_NAMES = {v: k for k, v in JOB_STATES.items()}


def timestamp(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


# --- tensors -----------------------------------------------------------------------------


def decode_tensor(t: tensor_pb2.Tensor, field: str, max_elements: int) -> np.ndarray:
    """A Tensor message as an ndarray (a read-only view of its bytes, no copy).

    Checks, in order and before any allocation: a known dtype, a non-empty shape of positive
    dimensions, at most ``max_elements`` elements, and a byte length of exactly
    prod(shape) * itemsize.
    """
    if t.dtype not in DTYPES:
        raise InvalidArgument(
            f"{field}.dtype must be DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8, got {t.dtype}",
            f"{field}.dtype",
        )
    shape = tuple(int(d) for d in t.shape)
    if not shape or any(d < 1 for d in shape):
        raise InvalidArgument(
            f"{field}.shape must be positive dimensions, got {list(shape)}", f"{field}.shape"
        )
    count = math.prod(shape)  # Python int: no overflow
    if count > max_elements:
        raise InvalidArgument(
            f"{field} has {count:,} elements; the limit is {max_elements:,}", f"{field}.shape"
        )
    dtype = DTYPES[t.dtype]
    if len(t.data) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{field}.data has {len(t.data):,} bytes; shape {list(shape)} of "
            f"{DTYPE_NAMES[t.dtype]} needs {count * dtype.itemsize:,}",
            f"{field}.data",
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def check_finite(x: np.ndarray, field: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise InvalidArgument(f"{field} holds {bad} NaN or infinite values", field)


# --- specs -------------------------------------------------------------------------------


def spec_from_proto(spec: models_pb2.ModelSpec) -> dict[str, Any]:
    """A ModelSpec as the engine's spec dict (only the fields that are set)."""
    try:
        return _convert.spec_from_proto(spec)
    except _convert.SpecDecodeError as e:
        raise InvalidArgument(str(e), f"spec.{e.field}") from e


# --- records -> messages -----------------------------------------------------------------


def epoch_to_proto(row: dict[str, Any]) -> models_pb2.EpochMetrics:
    m = models_pb2.EpochMetrics(
        epoch=row["epoch"], loss=row["loss"], accuracy=row["accuracy"],
        learning_rate=row["lr"], seconds=row["seconds"],
    )  # fmt: skip
    if row.get("val_loss") is not None:
        m.val_loss = row["val_loss"]
        m.val_accuracy = row["val_accuracy"]
    return m


def version_to_proto(v: VersionRecord) -> models_pb2.ModelVersion:
    return models_pb2.ModelVersion(
        version=v.version, create_time=timestamp(v.create_time), job_id=v.job_id,
        history=[epoch_to_proto(r) for r in v.history], source=v.source,
    )  # fmt: skip


def model_to_proto(m: ModelRecord, output_shape: tuple[int, ...], macs: int) -> models_pb2.Model:
    return models_pb2.Model(
        id=m.id, name=m.name, spec=spec_to_proto(m.spec), parameter_count=m.parameter_count,
        versions=[version_to_proto(v) for v in m.versions], latest_version=m.latest_version,
        seed=m.seed, create_time=timestamp(m.create_time), output_shape=list(output_shape),
        macs=macs,
    )  # fmt: skip


def dataset_to_proto(d: DatasetRecord) -> datasets_pb2.Dataset:
    return datasets_pb2.Dataset(
        id=d.id, name=d.name, sample_shape=list(d.sample_shape), dtype=DTYPE_ENUMS[d.dtype],
        num_classes=d.num_classes, sample_count=d.sample_count, size_bytes=d.size_bytes,
        sha256=d.sha256, create_time=timestamp(d.create_time),
    )  # fmt: skip


def progress_to_proto(p: dict[str, Any]) -> jobs_pb2.JobProgress:
    fields = jobs_pb2.JobProgress.DESCRIPTOR.fields_by_name
    return jobs_pb2.JobProgress(**{k: v for k, v in p.items() if k in fields})


def job_to_proto(j: JobRecord, queue_position: int = 0) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=j.id, model_id=j.model_id, dataset_id=j.dataset_id, state=JOB_STATES[j.state],
        request=train_request_from_config(j.config), progress=progress_to_proto(j.progress),
        history=[epoch_to_proto(r) for r in j.history], failure_reason=j.failure_reason,
        result_version=j.result_version, create_time=timestamp(j.create_time),
        start_time=timestamp(j.start_time), end_time=timestamp(j.end_time),
        attempts=j.attempts, queue_position=queue_position,
    )  # fmt: skip


# --- training requests -------------------------------------------------------------------


def train_config(req: jobs_pb2.TrainRequest) -> dict[str, Any]:
    """A TrainRequest as a plain dict (kept with the job), validated field by field."""

    def number(value: float, field: str, lo: float, hi: float = math.inf, lo_open: bool = False):  # type: ignore[no-untyped-def]
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
            raise InvalidArgument(f"{field} must be a number {bound}, got {value}", field)
        return float(value)

    if not req.model_id:
        raise InvalidArgument("model_id is required", "model_id")
    if not req.dataset_id:
        raise InvalidArgument("dataset_id is required", "dataset_id")
    if not 1 <= req.epochs <= 10_000:
        raise InvalidArgument(f"epochs must be in [1, 10000], got {req.epochs}", "epochs")
    if not 1 <= req.batch_size <= 65_536:
        raise InvalidArgument(
            f"batch_size must be in [1, 65536], got {req.batch_size}", "batch_size"
        )
    if req.seed < 0:
        raise InvalidArgument(f"seed must be >= 0, got {req.seed}", "seed")
    for name in ("checkpoint_every", "early_stopping_patience", "initial_version"):
        if getattr(req, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0, got {getattr(req, name)}", name)
    cfg: dict[str, Any] = {
        "model_id": req.model_id,
        "dataset_id": req.dataset_id,
        "epochs": req.epochs,
        "batch_size": req.batch_size,
        "seed": req.seed,
        "checkpoint_every": req.checkpoint_every or 1,
        "patience": req.early_stopping_patience or None,
        "initial_version": req.initial_version,
        "validation_dataset_id": "",
        "validation_fraction": 0.0,
    }
    which = req.WhichOneof("validation")
    if which == "validation_dataset_id":
        cfg["validation_dataset_id"] = req.validation_dataset_id
    elif which == "validation_fraction":
        cfg["validation_fraction"] = number(
            req.validation_fraction, "validation_fraction", 0, 1, lo_open=True
        )
        if cfg["validation_fraction"] >= 1:
            raise InvalidArgument("validation_fraction must be < 1", "validation_fraction")
    opt = req.WhichOneof("optimizer") or "sgd"
    msg = getattr(req, opt)
    default_lr = 0.01 if opt == "sgd" else 0.001  # PyTorch's defaults (SGD's is customary)
    lr = number(msg.lr or default_lr, f"{opt}.lr", 0, lo_open=True)
    o: dict[str, Any] = {"name": opt, "lr": lr}
    if opt == "sgd":
        o["momentum"] = number(msg.momentum, "sgd.momentum", 0, 0.999999)
        o["weight_decay"] = number(msg.weight_decay, "sgd.weight_decay", 0)
        o["nesterov"] = msg.nesterov
        if msg.nesterov and o["momentum"] == 0:
            raise InvalidArgument("sgd.nesterov needs momentum > 0", "sgd.nesterov")
    else:
        b1 = msg.beta1 if msg.HasField("beta1") else 0.9
        b2 = msg.beta2 if msg.HasField("beta2") else 0.999
        o["betas"] = [
            number(b1, f"{opt}.beta1", 0, 0.999999),
            number(b2, f"{opt}.beta2", 0, 0.999999),
        ]
        o["eps"] = number(msg.eps if msg.HasField("eps") else 1e-8, f"{opt}.eps", 0, lo_open=True)
        if opt == "adamw":
            wd = msg.weight_decay if msg.HasField("weight_decay") else 0.01
        else:
            wd = msg.weight_decay
        o["weight_decay"] = number(wd, f"{opt}.weight_decay", 0)
    cfg["optimizer"] = o
    kind = req.schedule.WhichOneof("kind") if req.HasField("schedule") else None
    if kind == "step":
        if req.schedule.step.step_size < 1:
            raise InvalidArgument("schedule.step.step_size must be >= 1", "schedule.step.step_size")
        gamma = number(req.schedule.step.gamma or 0.1, "schedule.step.gamma", 0, lo_open=True)
        cfg["schedule"] = {"kind": "step", "step_size": req.schedule.step.step_size, "gamma": gamma}
    elif kind == "cosine":
        if req.schedule.cosine.t_max < 0:
            raise InvalidArgument("schedule.cosine.t_max must be >= 0", "schedule.cosine.t_max")
        eta = number(req.schedule.cosine.eta_min, "schedule.cosine.eta_min", 0)
        cfg["schedule"] = {"kind": "cosine", "t_max": req.schedule.cosine.t_max, "eta_min": eta}
    else:
        cfg["schedule"] = {"kind": "constant"}
    return cfg


def train_request_from_config(cfg: dict[str, Any]) -> jobs_pb2.TrainRequest:
    req = jobs_pb2.TrainRequest(
        model_id=cfg["model_id"], dataset_id=cfg["dataset_id"], epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"],
        early_stopping_patience=cfg["patience"] or 0, initial_version=cfg["initial_version"],
    )  # fmt: skip
    if cfg["validation_dataset_id"]:
        req.validation_dataset_id = cfg["validation_dataset_id"]
    elif cfg["validation_fraction"]:
        req.validation_fraction = cfg["validation_fraction"]
    o = cfg["optimizer"]
    if o["name"] == "sgd":
        req.sgd.CopyFrom(
            jobs_pb2.Sgd(
                lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                nesterov=o["nesterov"],
            )
        )  # fmt: skip
    else:
        msg = getattr(req, o["name"])
        msg.lr = o["lr"]
        msg.beta1, msg.beta2 = o["betas"]
        msg.eps = o["eps"]
        msg.weight_decay = o["weight_decay"]
    s = cfg["schedule"]
    if s["kind"] == "step":
        req.schedule.step.CopyFrom(jobs_pb2.StepLr(step_size=s["step_size"], gamma=s["gamma"]))
    elif s["kind"] == "cosine":
        req.schedule.cosine.CopyFrom(jobs_pb2.CosineLr(t_max=s["t_max"], eta_min=s["eta_min"]))
    return req


def infer_response(
    model_id: str, version: int, logits: np.ndarray, request_id: str = ""
) -> inference_pb2.InferResponse:
    # Fields are filled in place: building Tensor messages first and passing them in copies
    # them, which is measurable at one sample per call.
    out = inference_pb2.InferResponse(
        model_id=model_id, version=version, classes=logits.argmax(axis=1).tolist(),
        request_id=request_id,
    )  # fmt: skip
    fill_tensor(out.logits, logits)
    fill_tensor(out.probabilities, softmax(logits))
    return out
