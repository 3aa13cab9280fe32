"""Every RPC answers bad input with the documented status code and an actionable message;
validation errors carry google.rpc.BadRequest field violations. Never UNKNOWN or INTERNAL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cnnd.client import Client
from cnnd.v1 import (
    datasets_pb2 as dp,
)
from cnnd.v1 import (
    inference_pb2 as ip,
)
from cnnd.v1 import (
    jobs_pb2 as jp,
)
from cnnd.v1 import (
    models_pb2 as mp,
)
from cnnd.v1 import (
    service_pb2_grpc,
)
from cnnd.v1 import (
    tensor_pb2 as tp,
)
from tests.conftest import SMALL_SPEC

C = grpc.StatusCode
GOOD = mp.ModelSpec(
    input_shape=[1, 8, 8],
    layers=[mp.Layer(flatten=mp.Flatten()), mp.Layer(linear=mp.Linear(out_features=10))],
)


def tensor(
    shape: list[int], dtype: int = tp.DATA_TYPE_FLOAT32, nbytes: int | None = None
) -> tp.Tensor:
    n = int(np.prod(shape)) * (4 if dtype == tp.DATA_TYPE_FLOAT32 else 1)
    return tp.Tensor(shape=shape, dtype=dtype, data=b"\0" * (n if nbytes is None else nbytes))


def upload(header: dp.DatasetHeader, *parts: dp.UploadDatasetRequest) -> list[Any]:
    return [dp.UploadDatasetRequest(header=header), *parts]


def header(**kw: Any) -> dp.DatasetHeader:
    base = dict(name="d", sample_shape=[1, 8, 8], dtype=tp.DATA_TYPE_FLOAT32, num_classes=10,
                sample_count=2, sha256="0" * 64)  # fmt: skip
    return dp.DatasetHeader(**{**base, **kw})


@pytest.fixture
def stub(client: Client) -> service_pb2_grpc.CnndServiceStub:
    """A raw stub beside a model "m" (trained once) and a dataset "d"."""
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    model = client.create_model(SMALL_SPEC, name="m")
    data = client.upload_dataset(x, y, name="d", num_classes=10)
    client.train(model, data, epochs=1).wait(progress=False)
    client.create_model(SMALL_SPEC, name="untrained")
    return client.stub


CASES: list[tuple[str, str, Callable[[], Any], grpc.StatusCode, str]] = [
    # (id, method, request factory, expected code, text the message must contain)
    ("model-name-empty", "CreateModel", lambda: mp.CreateModelRequest(spec=GOOD), C.INVALID_ARGUMENT, "name is required"),
    ("model-name-traversal", "CreateModel", lambda: mp.CreateModelRequest(name="../x", spec=GOOD), C.INVALID_ARGUMENT, "not valid"),
    ("model-exists", "CreateModel", lambda: mp.CreateModelRequest(name="m", spec=GOOD), C.ALREADY_EXISTS, "already exists"),
    ("spec-no-layers", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 8, 8])), C.INVALID_ARGUMENT, "layers"),
    ("spec-bad-shape", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 8], layers=GOOD.layers)), C.INVALID_ARGUMENT, "input_shape"),
    ("spec-kernel-too-big", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 4, 4], layers=[mp.Layer(conv2d=mp.Conv2d(out_channels=2, kernel_size=[5]))])), C.INVALID_ARGUMENT, "kernel 5x5 is larger than its padded input 4x4"),
    ("spec-huge-width", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 8, 8], layers=[mp.Layer(flatten=mp.Flatten()), mp.Layer(linear=mp.Linear(out_features=2**31))])), C.INVALID_ARGUMENT, "out_features"),
    ("spec-empty-layer", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 8, 8], layers=[mp.Layer()])), C.INVALID_ARGUMENT, "no layer type"),
    ("spec-not-classifier", "CreateModel", lambda: mp.CreateModelRequest(name="x", spec=mp.ModelSpec(input_shape=[1, 8, 8], layers=[mp.Layer(relu=mp.ReLU())])), C.INVALID_ARGUMENT, "class scores"),
    ("get-model-missing", "GetModel", lambda: mp.GetModelRequest(model_id="nope"), C.NOT_FOUND, "no model"),
    ("get-model-empty", "GetModel", mp.GetModelRequest, C.INVALID_ARGUMENT, "model_id is required"),
    ("list-models-token", "ListModels", lambda: mp.ListModelsRequest(page_token="garbage!"), C.INVALID_ARGUMENT, "page_token"),
    ("list-models-size", "ListModels", lambda: mp.ListModelsRequest(page_size=-1), C.INVALID_ARGUMENT, "page_size"),
    ("delete-model-missing", "DeleteModel", lambda: mp.DeleteModelRequest(model_id="nope"), C.NOT_FOUND, "no model"),
    ("get-dataset-missing", "GetDataset", lambda: dp.GetDatasetRequest(dataset_id="nope"), C.NOT_FOUND, "no dataset"),
    ("delete-dataset-missing", "DeleteDataset", lambda: dp.DeleteDatasetRequest(dataset_id="nope"), C.NOT_FOUND, "no dataset"),
    ("train-no-model", "Train", lambda: jp.TrainRequest(model_id="nope", dataset_id="d", epochs=1, batch_size=1), C.NOT_FOUND, "no model"),
    ("train-no-dataset", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="nope", epochs=1, batch_size=1), C.NOT_FOUND, "no dataset"),
    ("train-epochs", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=0, batch_size=1), C.INVALID_ARGUMENT, "epochs"),
    ("train-batch", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=-3), C.INVALID_ARGUMENT, "batch_size"),
    ("train-lr", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=1, sgd=jp.Sgd(lr=float("nan"))), C.INVALID_ARGUMENT, "sgd.lr"),
    ("train-momentum", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=1, sgd=jp.Sgd(lr=0.1, momentum=1.5)), C.INVALID_ARGUMENT, "momentum"),
    ("train-fraction", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=1, validation_fraction=1.5), C.INVALID_ARGUMENT, "validation_fraction"),
    ("train-version", "Train", lambda: jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=1, initial_version=9), C.NOT_FOUND, "no version 9"),
    ("get-job-missing", "GetJob", lambda: jp.GetJobRequest(job_id="job_0000000000000000"), C.NOT_FOUND, "no job"),
    ("cancel-job-missing", "CancelJob", lambda: jp.CancelJobRequest(job_id="job_0000000000000000"), C.NOT_FOUND, "no job"),
    ("list-jobs-model", "ListJobs", lambda: jp.ListJobsRequest(model_id="nope"), C.NOT_FOUND, "no model"),
    ("infer-missing-model", "Infer", lambda: ip.InferRequest(model_id="nope", input=tensor([1, 1, 8, 8])), C.NOT_FOUND, "no model"),
    ("infer-untrained", "Infer", lambda: ip.InferRequest(model_id="untrained", input=tensor([1, 1, 8, 8])), C.FAILED_PRECONDITION, "no trained version"),
    ("infer-version", "Infer", lambda: ip.InferRequest(model_id="m", version=5, input=tensor([1, 1, 8, 8])), C.NOT_FOUND, "no version 5"),
    ("infer-no-input", "Infer", lambda: ip.InferRequest(model_id="m"), C.INVALID_ARGUMENT, "input is required"),
    ("infer-shape", "Infer", lambda: ip.InferRequest(model_id="m", input=tensor([2, 1, 9, 8])), C.INVALID_ARGUMENT, "expects [N, 1, 8, 8]"),
    ("infer-bytes", "Infer", lambda: ip.InferRequest(model_id="m", input=tensor([1, 1, 8, 8], nbytes=7)), C.INVALID_ARGUMENT, "needs 256"),
    ("infer-dtype", "Infer", lambda: ip.InferRequest(model_id="m", input=tp.Tensor(shape=[1, 1, 8, 8], data=b"\0" * 256)), C.INVALID_ARGUMENT, "dtype"),
    ("infer-zero-dim", "Infer", lambda: ip.InferRequest(model_id="m", input=tensor([0, 1, 8, 8])), C.INVALID_ARGUMENT, "positive"),
    ("infer-overflow", "Infer", lambda: ip.InferRequest(model_id="m", input=tensor([2**40, 2**40, 8, 8], nbytes=0)), C.INVALID_ARGUMENT, "elements"),
    ("infer-nan", "Infer", lambda: ip.InferRequest(model_id="m", input=tp.Tensor(shape=[1, 1, 8, 8], dtype=tp.DATA_TYPE_FLOAT32, data=np.full(64, np.nan, np.float32).tobytes())), C.INVALID_ARGUMENT, "NaN"),
    ("inspect-batch", "Inspect", lambda: ip.InspectRequest(model_id="m", input=tensor([2, 1, 8, 8])), C.INVALID_ARGUMENT, "one sample"),
    ("inspect-class", "Inspect", lambda: ip.InspectRequest(model_id="m", input=tensor([1, 1, 8, 8]), target_class=10), C.INVALID_ARGUMENT, "target_class"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "make", "code", "text"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_unary_errors(stub, method: str, make, code: grpc.StatusCode, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(make(), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


def test_validation_errors_carry_field_violations(stub) -> None:  # type: ignore[no-untyped-def]
    req = mp.CreateModelRequest(
        name="x",
        spec=mp.ModelSpec(input_shape=[1, 4, 4], layers=[
            mp.Layer(relu=mp.ReLU()), mp.Layer(conv2d=mp.Conv2d(out_channels=2, kernel_size=[5])),
        ]),
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateModel(req)
    status = rpc_status.from_call(info.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "spec.layers[1].kernel_size"
    assert "layer 1 (conv2d)" in bad.field_violations[0].description


UPLOADS = [
    ("no-header", lambda: [dp.UploadDatasetRequest(images=b"x")], C.INVALID_ARGUMENT, "header"),
    ("bad-shape", lambda: upload(header(sample_shape=[8, 8])), C.INVALID_ARGUMENT, "sample_shape"),
    ("bad-classes", lambda: upload(header(num_classes=1)), C.INVALID_ARGUMENT, "num_classes"),
    ("bad-sha", lambda: upload(header(sha256="xyz")), C.INVALID_ARGUMENT, "sha256"),
    ("bad-name", lambda: upload(header(name="a/b")), C.INVALID_ARGUMENT, "not valid"),
    ("exists", lambda: upload(header(name="d")), C.ALREADY_EXISTS, "already exists"),
    ("too-big", lambda: upload(header(sample_count=2**40)), C.RESOURCE_EXHAUSTED, "limit"),
    ("short", lambda: upload(header(name="e"), dp.UploadDatasetRequest(images=b"\0" * 8)), C.INVALID_ARGUMENT, "received"),
    ("long", lambda: upload(header(name="e"), dp.UploadDatasetRequest(images=b"\0" * 1000)), C.INVALID_ARGUMENT, "more image bytes"),
    ("order", lambda: upload(header(name="e"), dp.UploadDatasetRequest(labels=b"\0" * 8), dp.UploadDatasetRequest(images=b"\0" * 512)), C.INVALID_ARGUMENT, "before labels"),
    ("checksum", lambda: upload(header(name="e"), dp.UploadDatasetRequest(images=b"\0" * 512), dp.UploadDatasetRequest(labels=b"\0" * 8)), C.INVALID_ARGUMENT, "checksum"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "code", "text"), [u[1:] for u in UPLOADS],
                         ids=[u[0] for u in UPLOADS])  # fmt: skip
def test_upload_errors_leave_nothing_behind(stub, server, make, code, text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadDataset(iter(make()), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    assert [d.name for d in stub.ListDatasets(dp.ListDatasetsRequest()).datasets] == ["d"]
    assert list((server.deps.store.root / "tmp").iterdir()) == []


def _labelled(labels: np.ndarray, images: np.ndarray) -> list[dp.UploadDatasetRequest]:
    img, lab = images.tobytes(), labels.astype("<i4").tobytes()
    h = header(name="e", sample_count=len(labels), sha256=hashlib.sha256(img + lab).hexdigest())
    return upload(h, dp.UploadDatasetRequest(images=img), dp.UploadDatasetRequest(labels=lab))


def test_upload_checks_labels_and_values(stub) -> None:  # type: ignore[no-untyped-def]
    ok = np.zeros((2, 1, 8, 8), np.float32)
    for labels, images, text in (
        (np.array([0, 10]), ok, "labels must be in [0, 10)"),
        (np.array([0, -1]), ok, "labels must be in"),
        (np.array([0, 1]), np.full_like(ok, np.inf), "NaN or infinite"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDataset(iter(_labelled(labels, images)))
        assert info.value.code() == C.INVALID_ARGUMENT and text in info.value.details()


def test_delete_in_use_and_cancel(stub, client: Client) -> None:  # type: ignore[no-untyped-def]
    ended = client.list_jobs()[0]
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelJob(jp.CancelJobRequest(job_id=ended.id))
    assert info.value.code() == C.FAILED_PRECONDITION and "already ended" in info.value.details()
    job = client.train("m", "d", epochs=10_000, batch_size=1)
    for request, method in (
        (mp.DeleteModelRequest(model_id="m"), "DeleteModel"),
        (dp.DeleteDatasetRequest(dataset_id="d"), "DeleteDataset"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request)
        assert info.value.code() == C.FAILED_PRECONDITION, info.value.details()
        assert "cancel it first" in info.value.details()
    assert job.cancel().state in ("QUEUED", "RUNNING", "CANCELLED")
    assert job.wait(progress=False, timeout=30).state == "CANCELLED"
    client.delete_model("m")
    client.delete_dataset("d")
    assert [m.name for m in client.list_models()] == ["untrained"]


def test_infer_stream_reports_errors_in_place(client: Client, stub) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros((1, 1, 8, 8), np.float32)
    results = list(client.infer_stream("m", [x, np.zeros((1, 1, 9, 9), np.float32), x]))
    assert [type(r).__name__ for r in results] == ["InferResult", "InvalidArgument", "InferResult"]
    np.testing.assert_array_equal(results[0].logits, results[2].logits)
