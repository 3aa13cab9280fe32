"""CreateModel, GetModel, ListModels, DeleteModel, ExportModel, ImportModel."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

from cnnd.core import SpecError, model_arrays, model_from_arrays, validate_spec
from cnnd.core.io import load_npz, npz_bytes
from cnnd.server import convert
from cnnd.server.deps import Deps
from cnnd.server.errors import InvalidArgument, ResourceExhausted
from cnnd.server.store.base import ModelRecord, now
from cnnd.server.validate import (
    check_key,
    check_name,
    decode_page_token,
    encode_page_token,
    new_id,
    page_size,
)
from cnnd.v1 import models_pb2

EXPORT_CHUNK = 1 << 20
MAX_SEED = 2**63 - 1


def model_message(deps: Deps, record: ModelRecord) -> models_pb2.Model:
    summary = deps.registry.summary(record)
    return convert.model_to_proto(record, summary.output_shape, summary.macs)


def create_model(deps: Deps, req: models_pb2.CreateModelRequest) -> models_pb2.Model:
    check_name(req.name)
    if req.seed < 0:
        raise InvalidArgument(f"seed must be >= 0, got {req.seed}", "seed")
    spec = convert.spec_from_proto(req.spec)
    normalised, summary = validate_spec(spec, deps.config.limits.spec_limits())
    if len(summary.output_shape) != 1:
        raise SpecError(
            f"the model's output {summary.output_shape} is not a vector of class scores; "
            "end with flatten and linear",
            "layers",
        )
    record = ModelRecord(
        id=new_id("mdl"), name=req.name, spec=normalised, seed=req.seed,
        parameter_count=summary.parameters, create_time=now(),
    )  # fmt: skip
    deps.store.create_model(record)
    return model_message(deps, record)


def get_model(deps: Deps, req: models_pb2.GetModelRequest) -> models_pb2.Model:
    return model_message(deps, deps.registry.record(check_key(req.model_id, "model_id")))


def list_models(deps: Deps, req: models_pb2.ListModelsRequest) -> models_pb2.ListModelsResponse:
    size = page_size(req.page_size)
    records = deps.store.list_models(size + 1, decode_page_token(req.page_token))
    out = models_pb2.ListModelsResponse(models=[model_message(deps, r) for r in records[:size]])
    if len(records) > size:
        out.next_page_token = encode_page_token(records[size - 1].id)
    return out


def delete_model(deps: Deps, req: models_pb2.DeleteModelRequest) -> models_pb2.DeleteModelResponse:
    record = deps.registry.record(check_key(req.model_id, "model_id"))
    deps.store.delete_model(record.id)
    deps.registry.forget(record.id)
    return models_pb2.DeleteModelResponse()


def export_model(
    deps: Deps, req: models_pb2.ExportModelRequest
) -> Iterator[models_pb2.ExportModelResponse]:
    loaded = deps.registry.load(check_key(req.model_id, "model_id"), req.version, True)
    data = npz_bytes(model_arrays(loaded.model))
    for lo in range(0, len(data), EXPORT_CHUNK):
        yield models_pb2.ExportModelResponse(chunk=data[lo : lo + EXPORT_CHUNK])


def import_model(deps: Deps, requests: Iterable[models_pb2.ImportModelRequest]) -> models_pb2.Model:
    it = iter(requests)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message must be a header", "header")
    header = first.header
    check_name(header.name, "header.name")
    limit = deps.config.limits.max_parameters * 4 + (16 << 20)
    if header.size_bytes < 0 or header.size_bytes > limit:
        raise ResourceExhausted(
            f"header.size_bytes {header.size_bytes:,} exceeds the import limit of {limit:,} bytes"
        )
    buf = io.BytesIO()
    for msg in it:
        if msg.WhichOneof("part") != "chunk":
            raise InvalidArgument("only chunks may follow the header", "chunk")
        if buf.tell() + len(msg.chunk) > limit:
            raise ResourceExhausted(f"the import exceeds the limit of {limit:,} bytes")
        buf.write(msg.chunk)
    if header.size_bytes and buf.tell() != header.size_bytes:
        raise InvalidArgument(
            f"received {buf.tell():,} bytes; the header announced {header.size_bytes:,}",
            "header.size_bytes",
        )
    try:
        model = model_from_arrays(load_npz(buf.getvalue()), deps.config.limits.spec_limits())
    except SpecError:
        raise
    except ValueError as e:
        raise InvalidArgument(f"not a cnnd model archive: {e}", "chunk") from e
    summary = model.summary_info
    if len(summary.output_shape) != 1:
        raise InvalidArgument("the model's output is not a vector of class scores", "chunk")
    record = ModelRecord(
        id=new_id("mdl"), name=header.name, spec=model.spec, seed=0,
        parameter_count=summary.parameters, create_time=now(),
    )  # fmt: skip
    deps.store.create_model(record)
    deps.store.add_version(record.id, npz_bytes(model_arrays(model)), "", "import", [])
    return model_message(deps, deps.registry.record(record.id))
