"""Building the server (``create_server``) and running it (``serve``), kept apart so tests
build one on port 0 and talk to it over a real channel.

Start-up: open the store (recovering jobs a dead process left RUNNING), bind, start the job
runner, compile the kernels, then report SERVING. Shutdown (SIGTERM): health NOT_SERVING at
once, no new RPCs, in-flight calls get the grace period, running jobs checkpoint at their next
step and go back to QUEUED for the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnnd.core.warmup import warmup
from cnnd.server.auth import AuthConfigError, AuthInterceptor, check_bind, load_tokens
from cnnd.server.batching import Batcher
from cnnd.server.config import ServerConfig
from cnnd.server.deps import Deps
from cnnd.server.limiter import ConcurrencyLimiter
from cnnd.server.metrics import Metrics, MetricsInterceptor
from cnnd.server.registry import Registry
from cnnd.server.rpc import DecodeGuard
from cnnd.server.servicer import CnndServicer
from cnnd.server.store.base import Store
from cnnd.server.training import JobBoard, JobRunner
from cnnd.v1 import service_pb2, service_pb2_grpc

log = logging.getLogger("cnnd.server")

STORE_CHECK_SECONDS = 2.0
HEALTH_RESERVE = 8  # worker threads beyond the API's concurrency limit
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["CnndService"].full_name


def open_store(config: ServerConfig) -> Store:
    """The store named by ``config.store``: SQLite in the data dir, or PostgreSQL."""
    if config.store.startswith(("postgresql://", "postgres://")):
        from cnnd.server.store.postgres import PostgresStore

        return PostgresStore(config.store)
    if config.store not in ("", "sqlite"):
        raise ValueError(f"unknown store {config.store!r}; use 'sqlite' or 'postgresql://...'")
    from cnnd.server.store.sqlite import SQLiteStore

    store = SQLiteStore(config.data_dir)
    recovered = store.recover()
    if recovered:
        log.info("resuming %d job(s) interrupted by the previous process", len(recovered))
    return store


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    size = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class Server:
    """A built cnnd server: ``start()``, then ``stop()`` (or ``wait_for_termination()``)."""

    config: ServerConfig
    grpc_server: grpc.Server
    deps: Deps
    health: health.HealthServicer
    port: int
    limiter: ConcurrencyLimiter
    extras: list[Any] = field(default_factory=list)  # things with .stop(): the /metrics server
    _stopped: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)  # kernels compiled

    def start(self) -> None:
        self.grpc_server.start()
        self.deps.runner.start()
        threading.Thread(target=self._warm, name="cnnd-warmup", daemon=True).start()
        log.info("cnnd listening on %s:%d", self.config.host, self.port)

    def _warm(self) -> None:
        seconds = warmup()
        if self.deps.metrics is not None:
            self.deps.metrics.compile_seconds.set(seconds)
        log.info("kernels ready in %.1f s", seconds)
        self._ready.set()
        self._watch_store()

    def _watch_store(self) -> None:
        """SERVING while the store answers: a replica that cannot reach its database is taken
        out of rotation by its readiness probe instead of failing calls."""
        serving: bool | None = None
        while not self.deps.shutting_down.is_set():
            ok = self.deps.store.ping()
            if ok != serving and not self.deps.shutting_down.is_set():
                serving = ok
                self.set_serving(ok)
                log.log(logging.INFO if ok else logging.WARNING,
                        "SERVING" if ok else "store unreachable; NOT_SERVING")  # fmt: skip
            self.deps.shutting_down.wait(STORE_CHECK_SECONDS)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> bool:
        """Drain and stop: NOT_SERVING at once and new API calls refused (UNAVAILABLE) while
        health keeps answering; running jobs checkpoint at their next step and go back to
        the queue; calls in flight get the rest of the grace period. True when every job
        checkpointed in time."""
        if self._stopped.is_set():
            return True
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.set_serving(False)
        self.deps.shutting_down.set()
        drained = self.deps.runner.drain(grace)
        self.limiter.wait_idle(max(0.0, deadline - time.monotonic()))
        self.grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
        for extra in self.extras:
            extra.stop()
        self.deps.store.close()
        self._stopped.set()
        log.info("cnnd stopped%s", "" if drained else " (some jobs did not checkpoint in time)")
        return drained

    def wait_for_termination(self) -> None:
        self._stopped.wait()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is too."""
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise AuthConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise AuthConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        key = Path(config.tls_key).read_bytes()
        cert = Path(config.tls_cert).read_bytes()
        ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as e:
        raise AuthConfigError(f"cannot read a TLS file: {e}") from e
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def create_server(config: ServerConfig) -> tuple[Server, int]:
    """Build (not start) a server for ``config``; returns it and the bound port (``port=0``
    binds a free one). Raises AuthConfigError for an unsafe or broken security setup."""
    tokens = load_tokens(config.tokens_file)
    check_bind(config.host, tokens, config.insecure)
    if config.metrics_port:  # /metrics has no authentication of its own
        check_bind(config.metrics_host or config.host, tokens, config.insecure)
    credentials = server_credentials(config)
    store = open_store(config)
    metrics = Metrics(store)
    # Outermost first: every call is measured, then authenticated, then counted against the
    # concurrency limit (so unauthenticated floods cannot take the slots).
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics), DecodeGuard()]
    if tokens.enabled:
        interceptors.append(AuthInterceptor(tokens))
    limit = config.limits.max_concurrent_rpcs
    limiter = ConcurrencyLimiter(limit)
    interceptors.append(limiter)
    spec_limits = config.limits.spec_limits()
    board = JobBoard()
    registry = Registry(store, spec_limits)
    worker = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    runner = JobRunner(
        store, spec_limits, worker, max_concurrent=config.limits.max_concurrent_jobs,
        lease_seconds=config.lease_seconds, board=board, hooks=metrics,
        on_version=registry.forget,
    )  # fmt: skip
    batcher = Batcher(config.batching, metrics) if config.batching.enabled else None
    deps = Deps(
        config=config, store=store, registry=registry, runner=runner, board=board,
        metrics=metrics, batcher=batcher, shutting_down=limiter.draining,
    )  # fmt: skip
    # Threads are made on demand; the pool exceeds the limit so health always finds one, and
    # gRPC's own cap is a backstop above both.
    workers = max(config.threads, limit + HEALTH_RESERVE)
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnd-rpc"),
        interceptors=interceptors,
        options=grpc_options(config),
        maximum_concurrent_rpcs=workers + HEALTH_RESERVE,
    )
    service_pb2_grpc.add_CnndServiceServicer_to_server(CnndServicer(deps), grpc_server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    address = f"{config.host}:{config.port}"
    if ":" in config.host and not config.host.startswith("["):
        address = f"[{config.host}]:{config.port}"
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as e:
        store.close()
        raise OSError(f"could not bind {address}: {e}") from e
    server = Server(config, grpc_server, deps, health_servicer, port, limiter)
    if config.metrics_port:
        try:
            server.extras.append(metrics.serve(config.metrics_host or config.host,
                                               config.metrics_port))  # fmt: skip
        except OSError:
            store.close()
            raise
    server.set_serving(False)
    return server, port


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; exit code 0 after a clean drain, 2 when the
    configuration is refused."""
    try:
        server, _ = create_server(config)
    except (AuthConfigError, OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        server.set_serving(False)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0
