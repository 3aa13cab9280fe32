"""Infer, InferStream and Inspect."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from google.rpc import status_pb2

from cnnd.core import as_float
from cnnd.core.kernels import softmax_cross_entropy
from cnnd.server import convert
from cnnd.server.batching import measured_forward
from cnnd.server.deps import Deps
from cnnd.server.errors import InvalidArgument, ServiceError
from cnnd.server.handlers.models import model_message
from cnnd.server.registry import Loaded
from cnnd.server.validate import check_key
from cnnd.v1 import inference_pb2


def decode_input(deps: Deps, loaded: Loaded, t: inference_pb2.InferRequest) -> np.ndarray:
    """The request's input as float32 (N, C, H, W), checked against the model."""
    if not t.HasField("input"):
        raise InvalidArgument("input is required", "input")
    expected = loaded.model.input_shape
    max_batch = deps.config.limits.max_infer_batch
    x = convert.decode_tensor(t.input, "input", max_batch * math.prod(expected))
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise InvalidArgument(
            f"input has shape {list(x.shape)}; model {loaded.record.name} expects "
            f"[N, {', '.join(map(str, expected))}]",
            "input.shape",
        )
    if x.shape[0] > max_batch:
        raise InvalidArgument(
            f"input has {x.shape[0]} samples; at most {max_batch} per request", "input.shape"
        )
    convert.check_finite(x, "input.data")
    return as_float(x)


def infer(deps: Deps, req: inference_pb2.InferRequest) -> inference_pb2.InferResponse:
    loaded = deps.registry.load(check_key(req.model_id, "model_id"), req.version)
    if deps.batcher is not None:
        with deps.batcher.arriving(loaded) as run:
            logits = run(decode_input(deps, loaded, req))
    else:
        logits = measured_forward(loaded.model, decode_input(deps, loaded, req), deps.metrics)
    if deps.metrics is not None:
        deps.metrics.infer_requests.labels(loaded.record.id).inc()
        deps.metrics.infer_samples.labels(loaded.record.id).inc(len(logits))
    return convert.infer_response(loaded.record.id, loaded.version, logits, req.request_id)


def infer_stream(
    deps: Deps,
    requests: Iterable[inference_pb2.InferStreamRequest],
    active: Callable[[], bool],
) -> Iterator[inference_pb2.InferStreamResponse]:
    """One response per request, in order; a failing request answers with its status in
    ``error`` and the stream goes on."""
    for msg in requests:
        if not active() or deps.shutting_down.is_set():
            return
        req = msg.request
        try:
            yield inference_pb2.InferStreamResponse(response=infer(deps, req))
        except ServiceError as e:
            yield inference_pb2.InferStreamResponse(
                response=inference_pb2.InferResponse(
                    request_id=req.request_id, model_id=req.model_id
                ),
                error=status_pb2.Status(code=e.code.value[0], message=e.message),
            )


def inspect(deps: Deps, req: inference_pb2.InspectRequest) -> inference_pb2.InspectResponse:
    loaded = deps.registry.load(check_key(req.model_id, "model_id"), req.version, True)
    summary = deps.registry.summary(loaded.record)
    out = inference_pb2.InspectResponse(
        model=model_message(deps, loaded.record), version=loaded.version
    )
    for r in summary.layers:
        out.layers.add(
            index=r.index, type=r.type, output_shape=list(r.output_shape),
            parameters=r.parameters, macs=r.macs, receptive_field=list(r.receptive_field or ()),
            jump=list(r.jump or ()),
        )  # fmt: skip
    for name, p in loaded.model.named_parameters().items():
        p64 = p.astype(np.float64)
        out.parameters.add(
            name=name, shape=list(p.shape), mean=float(p64.mean()), std=float(p64.std()),
            min=float(p64.min()), max=float(p64.max()), l2_norm=float(np.sqrt((p64**2).sum())),
        )  # fmt: skip
    if req.include_weights:
        for name, p in loaded.model.state_dict().items():
            out.weights.add(name=name, tensor=convert.encode_tensor(p.astype(np.float32)))
    if req.HasField("input"):
        x = decode_input(deps, loaded, inference_pb2.InferRequest(input=req.input))
        if x.shape[0] != 1:
            raise InvalidArgument(
                f"Inspect takes one sample (1, C, H, W), got {x.shape[0]}", "input.shape"
            )
        # A private copy: Inspect runs the backward pass, which keeps per-layer state.
        model = deps.registry.build(loaded.record, loaded.version)
        maps = model.activations(x)
        for i, (layer, fmap) in enumerate(zip(model.layers, maps, strict=True)):
            out.feature_maps.add(name=f"{i}.{layer.type}", tensor=convert.encode_tensor(fmap))
        logits = maps[-1]
        classes = logits.shape[1]
        target = int(req.target_class) if req.HasField("target_class") else int(logits.argmax())
        if not 0 <= target < classes:
            raise InvalidArgument(
                f"target_class must be in [0, {classes}), got {target}", "target_class"
            )
        model.forward(x, train=False)
        _, dlogits, _ = softmax_cross_entropy(logits, np.array([target]))
        saliency = model.backward(dlogits, need_input_grad=True)
        assert saliency is not None
        out.saliency.CopyFrom(convert.encode_tensor(saliency))
        out.logits.CopyFrom(convert.encode_tensor(logits))
        out.target_class = target
    return out
