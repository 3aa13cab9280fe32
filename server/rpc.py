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


class HandlerCache:
    """An interceptor's wrapped handler per method, built on the first call and reused while
    the handler beneath it stays the same object. gRPC asks interceptors for a handler on
    every call; wrapping anew each time cost several microseconds per interceptor."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        wrap: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap(handler)
        self._wrapped[method] = (handler, wrapped)  # one entry per method: bounded
        return wrapped


class _Undecodable:
    """Stands for a request whose bytes are not a valid protobuf message."""


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a malformed message raises
            return _Undecodable()

    return decode


class DecodeGuard(grpc.ServerInterceptor):
    """INVALID_ARGUMENT, not gRPC's own INTERNAL ("Exception deserializing request!"), for
    bytes that do not parse as the method's request message."""

    def __init__(self) -> None:
        self._cache = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._cache.get(handler_call_details.method, handler, _guard)


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    inner = behaviour(handler)
    message = "the request is not a valid protobuf message of the method's request type"

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return request

    def stream_of(requests: Any, context: grpc.ServicerContext) -> Any:
        for r in requests:
            yield check(r, context)

    def fn(request: Any, context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return inner(stream_of(request, context), context)
        return inner(check(request, context), context)

    make = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return make(
        fn,
        request_deserializer=_guarded(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
