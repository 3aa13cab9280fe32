"""UploadDataset, GetDataset, ListDatasets, DeleteDataset."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np

from cnnd.server import convert
from cnnd.server.deps import Deps
from cnnd.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from cnnd.server.store.base import DatasetRecord, now
from cnnd.server.validate import (
    check_key,
    check_name,
    decode_page_token,
    encode_page_token,
    new_id,
    page_size,
)
from cnnd.v1 import datasets_pb2

MAX_SAMPLE_DIM = 1 << 16
SCAN_BLOCK = 1 << 22  # elements checked for NaN/Inf at a time


def _check_header(deps: Deps, h: datasets_pb2.DatasetHeader) -> tuple[str, int, int]:
    """Validate a header; return (dtype name, image bytes, label bytes) it announces."""
    check_name(h.name, "header.name")
    shape = list(h.sample_shape)
    if len(shape) != 3 or any(not 1 <= d <= MAX_SAMPLE_DIM for d in shape):
        raise InvalidArgument(
            f"header.sample_shape must be (C, H, W) with each in [1, {MAX_SAMPLE_DIM}], "
            f"got {shape}",
            "header.sample_shape",
        )
    if h.dtype not in convert.DTYPES:
        raise InvalidArgument(
            "header.dtype must be DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8", "header.dtype"
        )
    if not 2 <= h.num_classes <= 100_000:
        raise InvalidArgument(
            f"header.num_classes must be in [2, 100000], got {h.num_classes}",
            "header.num_classes",
        )
    if h.sample_count < 1:
        raise InvalidArgument(
            f"header.sample_count must be >= 1, got {h.sample_count}", "header.sample_count"
        )
    if len(h.sha256) != 64 or any(c not in "0123456789abcdef" for c in h.sha256.lower()):
        raise InvalidArgument("header.sha256 must be 64 hex digits", "header.sha256")
    itemsize = convert.DTYPES[h.dtype].itemsize
    image_bytes = h.sample_count * math.prod(shape) * itemsize  # Python ints: no overflow
    label_bytes = h.sample_count * 4
    limit = deps.config.limits.max_dataset_bytes
    if image_bytes + label_bytes > limit:
        raise ResourceExhausted(
            f"the dataset needs {image_bytes + label_bytes:,} bytes; the limit is {limit:,}"
        )
    return convert.DTYPE_NAMES[h.dtype], image_bytes, label_bytes


def upload_dataset(
    deps: Deps, requests: Iterable[datasets_pb2.UploadDatasetRequest]
) -> datasets_pb2.Dataset:
    """Stream images then labels to disk as they arrive; commit only when sizes, checksum,
    labels and values all check out. A failed upload leaves nothing behind."""
    it = iter(requests)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message must be a header", "header")
    h = first.header
    dtype, image_bytes, label_bytes = _check_header(deps, h)
    if deps.store.get_dataset(h.name) is not None:
        raise AlreadyExists(f"a dataset named {h.name!r} already exists", "header.name")
    digest = hashlib.sha256()
    got_images = got_labels = 0
    with deps.store.dataset_writer(deps.config.limits.max_dataset_bytes) as writer:
        for msg in it:
            part = msg.WhichOneof("part")
            if part == "images":
                if got_labels:
                    raise InvalidArgument("images must all come before labels", "images")
                got_images += len(msg.images)
                if got_images > image_bytes:
                    raise InvalidArgument(
                        f"more image bytes than the header announces ({image_bytes:,})", "images"
                    )
                digest.update(msg.images)
                writer.write_images(msg.images)
            elif part == "labels":
                got_labels += len(msg.labels)
                if got_labels > label_bytes:
                    raise InvalidArgument(
                        f"more label bytes than the header announces ({label_bytes:,})", "labels"
                    )
                digest.update(msg.labels)
                writer.write_labels(msg.labels)
            else:
                raise InvalidArgument("only images and labels may follow the header", "part")
        if got_images != image_bytes or got_labels != label_bytes:
            raise InvalidArgument(
                f"received {got_images:,} image and {got_labels:,} label bytes; the header "
                f"announces {image_bytes:,} and {label_bytes:,}",
                "images",
            )
        if digest.hexdigest() != h.sha256.lower():
            raise InvalidArgument(
                "checksum mismatch: the bytes received do not match header.sha256", "header.sha256"
            )
        raw_images, raw_labels = writer.arrays()
        labels = raw_labels.view("<i4")
        if labels.min() < 0 or labels.max() >= h.num_classes:
            raise InvalidArgument(
                f"labels must be in [0, {h.num_classes}); got {labels.min()}..{labels.max()}",
                "labels",
            )
        if dtype == "float32":
            values = raw_images.view("<f4")
            for lo in range(0, values.size, SCAN_BLOCK):
                if not np.isfinite(values[lo : lo + SCAN_BLOCK]).all():
                    raise InvalidArgument("images hold NaN or infinite values", "images")
        del raw_images, raw_labels, labels
        record = DatasetRecord(
            id=new_id("ds"), name=h.name, sample_shape=tuple(h.sample_shape), dtype=dtype,
            num_classes=h.num_classes, sample_count=h.sample_count,
            size_bytes=image_bytes + label_bytes, sha256=h.sha256.lower(), create_time=now(),
        )  # fmt: skip
        writer.commit(record)
    return convert.dataset_to_proto(record)


def dataset(deps: Deps, key: str, field: str = "dataset_id") -> DatasetRecord:
    record = deps.store.get_dataset(check_key(key, field))
    if record is None:
        raise NotFound(f"no dataset with id or name {key!r}", field)
    return record


def get_dataset(deps: Deps, req: datasets_pb2.GetDatasetRequest) -> datasets_pb2.Dataset:
    return convert.dataset_to_proto(dataset(deps, req.dataset_id))


def list_datasets(
    deps: Deps, req: datasets_pb2.ListDatasetsRequest
) -> datasets_pb2.ListDatasetsResponse:
    size = page_size(req.page_size)
    records = deps.store.list_datasets(size + 1, decode_page_token(req.page_token))
    out = datasets_pb2.ListDatasetsResponse(
        datasets=[convert.dataset_to_proto(r) for r in records[:size]]
    )
    if len(records) > size:
        out.next_page_token = encode_page_token(records[size - 1].id)
    return out


def delete_dataset(
    deps: Deps, req: datasets_pb2.DeleteDatasetRequest
) -> datasets_pb2.DeleteDatasetResponse:
    deps.store.delete_dataset(dataset(deps, req.dataset_id).id)
    return datasets_pb2.DeleteDatasetResponse()
