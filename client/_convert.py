"""Conversions between the API's messages and Python values, shared by the SDK and the server.

A spec dict (the engine's format, see cnnd.core.spec) maps onto ModelSpec field by field;
pairs (kernel_size, stride, padding) accept one value or two. Tensors carry raw little-endian
row-major bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnd.v1 import models_pb2, tensor_pb2

PAIRS = ("kernel_size", "stride", "padding")
DTYPES: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
DTYPE_NAMES = {tensor_pb2.DATA_TYPE_FLOAT32: "float32", tensor_pb2.DATA_TYPE_UINT8: "uint8"}
DTYPE_ENUMS = {v: k for k, v in DTYPE_NAMES.items()}


def spec_to_proto(spec: dict[str, Any]) -> models_pb2.ModelSpec:
    """A spec dict as a ModelSpec; unknown layer types or arguments raise ValueError."""
    if not isinstance(spec, dict):
        raise ValueError(f"a spec is a dict with input_shape and layers, got {type(spec).__name__}")
    out = models_pb2.ModelSpec(input_shape=list(spec.get("input_shape", [])))
    for i, entry in enumerate(spec.get("layers", [])):
        kind = entry.get("type") if isinstance(entry, dict) else None
        layer = out.layers.add()
        if kind not in models_pb2.Layer.DESCRIPTOR.fields_by_name:
            raise ValueError(f"layer {i}: unknown type {kind!r}")
        msg = getattr(layer, kind)
        msg.SetInParent()
        fields = msg.DESCRIPTOR.fields_by_name
        for name, value in entry.items():
            if name == "type" or value is None:
                continue
            if name not in fields:
                raise ValueError(f"layer {i} ({kind}): unknown argument {name!r}")
            if name in PAIRS:
                getattr(msg, name).extend(value if isinstance(value, list | tuple) else [value])
            else:
                setattr(msg, name, value)
    return out


class SpecDecodeError(ValueError):
    """A ModelSpec that does not map onto a spec dict; ``field`` names the place."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def spec_from_proto(spec: models_pb2.ModelSpec) -> dict[str, Any]:
    """A ModelSpec as a spec dict holding only the fields that are set (the engine fills in
    defaults and validates the rest)."""
    layers = []
    for i, layer in enumerate(spec.layers):
        kind = layer.WhichOneof("kind")
        if kind is None:
            raise SpecDecodeError(f"layer {i}: no layer type is set", f"layers[{i}]")
        msg = getattr(layer, kind)
        entry: dict[str, Any] = {"type": kind}
        for fd in msg.DESCRIPTOR.fields:
            if fd.name in PAIRS:
                values = list(getattr(msg, fd.name))
                if len(values) > 2:
                    raise SpecDecodeError(
                        f"layer {i} ({kind}): {fd.name} takes one or two values, got {values}",
                        f"layers[{i}].{fd.name}",
                    )
                if values:
                    entry[fd.name] = values[0] if len(values) == 1 else values
            elif not fd.has_presence or msg.HasField(fd.name):
                entry[fd.name] = getattr(msg, fd.name)
        layers.append(entry)
    return {"input_shape": list(spec.input_shape), "layers": layers}


def encode_tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    """uint8 arrays travel as UINT8, everything else as FLOAT32."""
    t = tensor_pb2.Tensor()
    fill_tensor(t, a)
    return t


def fill_tensor(t: tensor_pb2.Tensor, a: np.ndarray) -> None:
    """encode_tensor into ``t``, an empty Tensor inside a message being built (filling it in
    place saves copying a finished Tensor into its parent)."""
    a = np.asarray(a)
    t.shape.extend(a.shape)
    if a.dtype == np.uint8:
        t.dtype = tensor_pb2.DATA_TYPE_UINT8
        t.data = a.tobytes(order="C")
    else:
        t.dtype = tensor_pb2.DATA_TYPE_FLOAT32
        t.data = np.ascontiguousarray(a, dtype="<f4").tobytes()


def decode_tensor(t: tensor_pb2.Tensor) -> np.ndarray:
    """A Tensor as a read-only ndarray over its bytes (the sender is trusted to be
    consistent; the server checks untrusted tensors with cnnd.server.convert)."""
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {t.dtype}")
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))
