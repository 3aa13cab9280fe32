"""CreateModel, GetModel, ListModels, UpdateModel, DeleteModel, ExportModel, ImportModel."""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from cnnd.core import SpecError, model_arrays, model_from_arrays, validate_spec
from cnnd.core.io import load_npz, npz_bytes
from cnnd.server import convert
from cnnd.server.deps import Deps
from cnnd.server.errors import InvalidArgument, ResourceExhausted
from cnnd.server.store.base import BATCHING_FIELDS, BatchingPolicy, ModelRecord, now
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
# A batch held longer than a second would cost more latency than any batch saves.
MAX_QUEUE_DELAY_US = 1_000_000


def model_message(deps: Deps, record: ModelRecord) -> models_pb2.Model:
    summary = deps.registry.summary(record)
    out = convert.model_to_proto(record, summary.output_shape, summary.macs)
    out.batching.CopyFrom(batching_to_proto(record.batching))
    return out


def batching_to_proto(policy: BatchingPolicy) -> models_pb2.BatchingPolicy:
    return models_pb2.BatchingPolicy(**policy.to_dict())


def batching_from_proto(
    deps: Deps, p: models_pb2.BatchingPolicy, field: str = "batching"
) -> BatchingPolicy:
    """The policy of a request, every set field checked (INVALID_ARGUMENT naming it, as
    ``<field>.max_batch_size``); unset fields stay None, the server's defaults."""
    size = p.max_batch_size if p.HasField("max_batch_size") else None
    limit = deps.config.limits.max_infer_batch  # a batch never exceeds what one call may send
    if size is not None and not 1 <= size <= limit:
        raise InvalidArgument(
            f"{field}.max_batch_size must be in [1, {limit}] (--max-infer-batch), got {size}",
            f"{field}.max_batch_size",
        )
    delay = p.max_queue_delay_us if p.HasField("max_queue_delay_us") else None
    if delay is not None and not 0 <= delay <= MAX_QUEUE_DELAY_US:
        raise InvalidArgument(
            f"{field}.max_queue_delay_us must be in [0, {MAX_QUEUE_DELAY_US}], got {delay}",
            f"{field}.max_queue_delay_us",
        )
    disabled = p.disabled if p.HasField("disabled") else None
    return BatchingPolicy(max_batch_size=size, max_queue_delay_us=delay, disabled=disabled)


def create_model(deps: Deps, req: models_pb2.CreateModelRequest) -> models_pb2.Model:
    check_name(req.name)
    if req.seed < 0:
        raise InvalidArgument(f"seed must be >= 0, got {req.seed}", "seed")
    batching = batching_from_proto(deps, req.batching)
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
        parameter_count=summary.parameters, create_time=now(), batching=batching,
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


def update_fields(req: models_pb2.UpdateModelRequest) -> list[str]:
    """The BatchingPolicy fields an UpdateModel changes, from its update_mask (AIP-134)."""
    if not req.update_mask.paths:  # implied: the fields the request sets
        return [f for f in BATCHING_FIELDS if req.batching.HasField(f)]
    fields: list[str] = []
    for path in req.update_mask.paths:
        name = path.removeprefix("batching.")
        if path in ("*", "batching"):
            fields += BATCHING_FIELDS
        elif path.startswith("batching.") and name in BATCHING_FIELDS:
            fields.append(name)
        else:
            known = ", ".join(["batching", *(f"batching.{f}" for f in BATCHING_FIELDS)])
            raise InvalidArgument(
                f"update_mask names {path[:80]!r}, which cannot be updated; use {known}",
                "update_mask",
            )
    return list(dict.fromkeys(fields))


def update_model(deps: Deps, req: models_pb2.UpdateModelRequest) -> models_pb2.Model:
    key = check_key(req.model_id, "model_id")
    batching = batching_from_proto(deps, req.batching)
    fields = update_fields(req)
    record = deps.registry.record(key)
    updated = deps.store.update_model_batching(record.id, batching, fields)
    deps.registry.refresh(record.id)  # this replica's next Infer sees it; others within the TTL
    return model_message(deps, updated)


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


def check_archive(data: bytes, limit: int, max_members: int) -> None:
    """Read only the zip directory and each .npy header of an uploaded .npz, so that numpy
    never allocates what the archive merely announces: at most ``max_members`` members, each a
    .npy array of a plain dtype whose header fits the bytes it holds, all of them expanding to
    at most ``limit`` bytes (a compressed archive could otherwise expand a thousandfold)."""
    if data.startswith(np.lib.format.MAGIC_PREFIX):
        raise InvalidArgument("not a cnnd model archive: a single .npy array, not a .npz", "chunk")
    if not data.startswith(b"PK"):
        return  # not a zip: load_npz refuses it (a pickle is never unpickled)
    try:
        # The directory size zipfile will parse (~600 bytes of memory per 46-byte entry): a
        # directory of millions of empty members is refused before it is parsed.
        end = zipfile._EndRecData(io.BytesIO(data))  # the record zipfile itself will use
        if end is not None and end[zipfile._ECD_SIZE] > 512 * max_members:
            raise ValueError(f"the zip directory is too large for at most {max_members} arrays")
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > max_members:
                raise ValueError(f"{len(members):,} members; a model has at most {max_members}")
            expanded = sum(m.file_size for m in members)
            if expanded > limit:
                raise ResourceExhausted(
                    f"the archive expands to {expanded:,} bytes; the import limit is {limit:,}"
                )
            for m in members:
                if not m.filename.endswith(".npy"):
                    raise ValueError(f"member {m.filename[:80]!r} is not a .npy array")
                with archive.open(m) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = {1: np.lib.format.read_array_header_1_0}.get(
                        major, np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise ValueError("the archive holds object arrays (pickled data); refused")
                if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > m.file_size:
                    raise ValueError(f"{m.filename[:80]!r} announces more data than it holds")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError,
            NotImplementedError) as e:  # fmt: skip
        raise InvalidArgument(f"not a cnnd model archive: {e}", "chunk") from e


def import_model(deps: Deps, requests: Iterable[models_pb2.ImportModelRequest]) -> models_pb2.Model:
    it = iter(requests)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message must be a header", "header")
    header = first.header
    check_name(header.name, "header.name")
    batching = batching_from_proto(deps, header.batching, "header.batching")
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
    # At most 5 arrays per layer (batchnorm's) and the spec.
    check_archive(buf.getvalue(), limit, 5 * deps.config.limits.max_layers + 1)
    try:
        model = model_from_arrays(load_npz(buf.getvalue()), deps.config.limits.spec_limits())
    except SpecError:
        raise
    except (ValueError, zlib.error) as e:
        raise InvalidArgument(f"not a cnnd model archive: {e}", "chunk") from e
    except RecursionError as e:  # json.loads of a spec nested thousands deep
        raise InvalidArgument("not a cnnd model archive: the spec nests too deeply", "chunk") from e
    summary = model.summary_info
    if len(summary.output_shape) != 1:
        raise InvalidArgument("the model's output is not a vector of class scores", "chunk")
    record = ModelRecord(
        id=new_id("mdl"), name=header.name, spec=model.spec, seed=0,
        parameter_count=summary.parameters, create_time=now(), batching=batching,
    )  # fmt: skip
    deps.store.create_model(record)
    deps.store.add_version(record.id, npz_bytes(model_arrays(model)), "", "import", [])
    return model_message(deps, deps.registry.record(record.id))
