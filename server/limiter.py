"""A cap on concurrent calls of the cnnd API that never starves the health service, and the
gate that closes it while the server drains.

gRPC's own ``maximum_concurrent_rpcs`` counts every call, health checks included, so a server
saturated with slow calls would also fail its Kubernetes probes and be restarted for being
busy. This interceptor counts only CnndService calls (streams for as long as they last) and
answers RESOURCE_EXHAUSTED beyond the limit; the worker pool is sized above the limit so that
health always finds a thread. While draining it answers UNAVAILABLE to new calls (clients
retry elsewhere) and lets ``wait_idle`` see the calls in flight finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cnnd.server.auth import SERVICE_PREFIX
from cnnd.server.rpc import HandlerCache, behaviour, rebuild


class ConcurrencyLimiter(grpc.ServerInterceptor):
    def __init__(self, limit: int, draining: threading.Event | None = None) -> None:
        self.limit = limit
        self.draining = draining or threading.Event()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._cache = HandlerCache()

    def _enter(self, context: grpc.ServicerContext) -> None:
        with self._cond:
            if self.draining.is_set():
                refused = (
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; retry (another replica will answer)",
                )
            elif self._in_flight >= self.limit:
                refused = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: {self.limit} calls in progress (the limit); retry with backoff",
                )
            else:
                self._in_flight += 1
                return
        context.abort(*refused)

    def _exit(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no API call is in flight; False if some still are after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        return self._cache.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = behaviour(handler)

        if handler.response_streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._enter(context)
                try:
                    yield from inner(request, context)
                finally:
                    self._exit()

            return rebuild(handler, stream)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context)
            try:
                return inner(request, context)
            finally:
                self._exit()

        return rebuild(handler, unary)
