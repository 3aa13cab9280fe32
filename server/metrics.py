"""Prometheus metrics: the gRPC ecosystem's RPC metrics, cnnd's own, and /metrics over HTTP.

RPC metrics use go-grpc-prometheus / py-grpc-prometheus names and labels, so existing
dashboards and alerts work: grpc_server_started_total, grpc_server_handled_total (with
grpc_code), grpc_server_handling_seconds, grpc_server_msg_received_total and
grpc_server_msg_sent_total. cnnd's own follow Prometheus conventions (cnnd_ prefix, base
units, _total for counters). Per-job series carry a job_id label and are removed when the job
ends, so cardinality stays bounded by the jobs running at once.

Each server has its own registry (tests run several servers in one process).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cnnd.core import StepEvent
from cnnd.server.rpc import HandlerCache, behaviour, rebuild
from cnnd.server.store.base import JobRecord, Store

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


class _StoreCollector(Collector):
    """Gauges read from the store at scrape time, cached briefly (a scrape must stay cheap)."""

    def __init__(self, store: Store, ttl: float = 5.0) -> None:
        self.store = store
        self.ttl = ttl
        self._cached: tuple[float, dict[str, int]] = (0.0, {})
        self._lock = threading.Lock()

    def _stats(self) -> dict[str, int]:
        with self._lock:
            at, stats = self._cached
            if time.monotonic() - at > self.ttl:
                try:
                    stats = self.store.stats()
                except Exception:  # an unreachable store shows as no data
                    stats = {}
                self._cached = (time.monotonic(), stats)
            return stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._stats()
        if not s:
            return
        for name, key, text in (
            ("cnnd_models", "models", "Models in the store."),
            ("cnnd_model_versions", "versions", "Trained model versions in the store."),
            ("cnnd_datasets", "datasets", "Datasets in the store."),
            ("cnnd_store_bytes", "bytes", "Bytes the store holds (tensors and metadata)."),
        ):
            yield GaugeMetricFamily(name, text, value=s.get(key, 0))
        jobs = GaugeMetricFamily("cnnd_jobs", "Training jobs by state.", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], s.get(f"jobs_{state}", 0))
        yield jobs


class Metrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, store: Store | None = None) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        if store is not None:
            r.register(_StoreCollector(store))
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status.",
            [*labels, "grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "grpc_server_msg_received_total",
            "Stream messages received by the server.",
            labels,
            registry=r,
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total", "Stream messages sent by the server.", labels, registry=r
        )
        self.infer_requests = Counter(
            "cnnd_inference_requests_total", "Inference requests answered.", ["model"], registry=r
        )
        self.infer_samples = Counter(
            "cnnd_inference_samples_total", "Samples classified.", ["model"], registry=r
        )
        self.infer_batch = Histogram(
            "cnnd_inference_batch_size",
            "Samples per forward pass of the engine (after dynamic batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.infer_queue = Histogram(
            "cnnd_inference_queue_seconds",
            "Time a request waited for its batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.infer_compute = Histogram(
            "cnnd_inference_compute_seconds",
            "Time of one forward pass of a batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.train_samples = Counter(
            "cnnd_training_samples_total",
            "Samples trained on (one per sample per epoch).",
            registry=r,
        )
        self.train_step = Histogram(
            "cnnd_training_step_seconds",
            "Time of one optimisation step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "cnnd_jobs_finished_total",
            "Training jobs that ended, by final state.",
            ["state"],
            registry=r,
        )
        self.job_duration = Histogram(
            "cnnd_job_duration_seconds",
            "Run time of a training job attempt, by how it ended.",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        job_labels = ["job_id", "model_id"]
        self.job_epoch = Gauge(
            "cnnd_job_epoch", "Current epoch of a running job.", job_labels, registry=r
        )
        self.job_progress = Gauge(
            "cnnd_job_progress_ratio",
            "Fraction of a running job's steps done.",
            job_labels,
            registry=r,
        )
        self.job_loss = Gauge(
            "cnnd_job_loss",
            "Running training loss of a running job's epoch.",
            job_labels,
            registry=r,
        )
        self.job_accuracy = Gauge(
            "cnnd_job_accuracy",
            "Running training accuracy of a running job's epoch.",
            job_labels,
            registry=r,
        )
        self.job_val_accuracy = Gauge(
            "cnnd_job_val_accuracy",
            "Validation accuracy of a running job's last epoch.",
            job_labels,
            registry=r,
        )
        self.compile_seconds = Gauge(
            "cnnd_kernel_compile_seconds",
            "Seconds the kernels took to compile or load at start.",
            registry=r,
        )
        self._per_job = (
            self.job_epoch,
            self.job_progress,
            self.job_loss,
            self.job_accuracy,
            self.job_val_accuracy,
        )

    # --- job hooks (called by the JobRunner) ---------------------------------------------
    def job_started(self, job: JobRecord) -> None:
        self.job_epoch.labels(job.id, job.model_id).set(0)

    def job_step(self, job: JobRecord, ev: StepEvent, seconds: float) -> None:
        labels = (job.id, job.model_id)
        self.job_epoch.labels(*labels).set(ev.epoch)
        done = ((ev.epoch - 1) * ev.steps + ev.step) / max(ev.epochs * ev.steps, 1)
        self.job_progress.labels(*labels).set(done)
        self.job_loss.labels(*labels).set(ev.loss)
        self.job_accuracy.labels(*labels).set(ev.accuracy)
        self.train_step.observe(seconds)
        self.train_samples.inc(ev.samples)

    def job_epoch_end(self, job: JobRecord, row: dict[str, Any]) -> None:
        if row.get("val_accuracy") is not None:
            self.job_val_accuracy.labels(job.id, job.model_id).set(row["val_accuracy"])

    def job_finished(self, job: JobRecord) -> None:
        self.jobs_finished.labels(job.state).inc()

    def job_stopped(self, job: JobRecord, seconds: float) -> None:
        """The job's thread ended (finished, drained or lost): drop its series."""
        ended = job.state if job.state in ("SUCCEEDED", "FAILED", "CANCELLED") else "INTERRUPTED"
        self.job_duration.labels(ended).observe(seconds)
        for gauge in self._per_job:
            with contextlib.suppress(KeyError):  # no series yet: the job never stepped
                gauge.remove(job.id, job.model_id)

    # --- HTTP ----------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> MetricsServer:
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(httpd, thread)


class MetricsServer:
    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread
        self.port = int(httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- RPC metrics interceptor -------------------------------------------------------------

_TYPES = {
    (False, False): "UNARY",
    (True, False): "CLIENT_STREAM",
    (False, True): "SERVER_STREAM",
    (True, True): "BIDI_STREAM",
}


def _code(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()  # type: ignore[attr-defined]
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return str(code.name)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, with the status it ended with."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._cache = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        return self._cache.get(full, handler, lambda h: self._wrap(full, h))

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        labels = (service, method, _TYPES[(streaming_in, streaming_out)])
        m = self.m

        def count_in(requests: Iterator[Any]) -> Iterator[Any]:
            for r in requests:
                m.received.labels(*labels).inc()
                yield r

        def finish(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            m.handled.labels(*labels, _code(context, failed)).inc()
            m.handling.labels(*labels).observe(time.perf_counter() - start)

        inner = behaviour(handler)

        if not streaming_out:

            def unary_out(request: Any, context: grpc.ServicerContext) -> Any:
                m.started.labels(*labels).inc()
                start = time.perf_counter()
                if streaming_in:
                    request = count_in(request)
                try:
                    response = inner(request, context)
                except BaseException:
                    finish(context, start, True)
                    raise
                finish(context, start, False)
                return response

            fn: Callable[..., Any] = unary_out
        else:

            def stream_out(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                m.started.labels(*labels).inc()
                start = time.perf_counter()
                if streaming_in:
                    request = count_in(request)
                failed = True
                try:
                    for response in inner(request, context):
                        m.sent.labels(*labels).inc()
                        yield response
                    failed = False
                finally:
                    finish(context, start, failed)

            fn = stream_out

        return rebuild(handler, fn)
