"""Helpers for server interceptors that wrap a method's behaviour."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that implements a method, whatever its kind of streaming."""
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)  # type: ignore[return-value]  # fmt: skip


def rebuild(handler: grpc.RpcMethodHandler, fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers as ``handler`` that runs ``fn``."""
    make = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return make(
        fn,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
