"""A bounded load run over loopback: 32 Infer clients (threads, one sample per request) and a
training job, for CNND_LOAD_SECONDS (default 120), against a spawned `cnnd serve
--metrics-port`. It proves that under that load

* no call fails, except RESOURCE_EXHAUSTED where a limit says so;
* the server's resident memory grows by less than 50 MiB after warm-up (VmRSS every second);
* /metrics answers every poll (once a second) within 2 s, and counts every Infer;
* the training job keeps running (its epochs advance) while inference is served.

Throughput, latency percentiles and RSS go to stdout, and as JSON to the file named by
CNND_LOAD_REPORT if set (docs/load.md records a run).
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnd.v1 import inference_pb2 as ip
from cnnd.v1 import service_pb2_grpc
from cnnd.v1 import tensor_pb2 as tp
from tests.conftest import SMALL_SPEC, ServerProcess, free_port

pytestmark = pytest.mark.slow

CLIENTS = 32
SECONDS = float(os.environ.get("CNND_LOAD_SECONDS", "120"))
WARMUP = min(20.0, SECONDS / 4)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
F32 = tp.DATA_TYPE_FLOAT32


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Load:
    """The clients, the samplers, and what they measured."""

    def __init__(self, target: str, metrics_url: str, pid: int, x: np.ndarray) -> None:
        self.target, self.metrics_url, self.pid, self.x = target, metrics_url, pid, x
        self.stop = threading.Event()
        self.t0 = 0.0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.codes: dict[str, int] = {}
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.scrapes: list[float] = []
        self.scrape_failures: list[str] = []
        self.last_scrape = ""

    def client(self, seed: int) -> None:
        """Single-sample Infer calls on its own channel until stopped."""
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(self.target) as channel:
            stub = service_pb2_grpc.CnndServiceStub(channel)
            while not self.stop.is_set():
                sample = self.x[rng.integers(len(self.x))][None]
                tensor = tp.Tensor(shape=list(sample.shape), dtype=F32, data=sample.tobytes())
                req = ip.InferRequest(model_id="m", input=tensor)
                t = time.perf_counter()
                try:
                    reply = stub.Infer(req, timeout=30)
                    assert len(reply.classes) == 1
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                dt = time.perf_counter() - t
                with self.lock:
                    self.codes[code.name] = self.codes.get(code.name, 0) + 1
                    if code == grpc.StatusCode.OK:
                        self.latencies.append(dt)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(0.01)

    def sample_rss(self) -> None:
        while not self.stop.wait(1.0):
            self.rss.append((time.monotonic() - self.t0, rss_mib(self.pid)))

    def poll_metrics(self) -> None:
        while not self.stop.wait(1.0):
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                    body = r.read().decode()
                    ok = r.status == 200 and "grpc_server_handled_total" in body
                dt = time.perf_counter() - t
                self.scrapes.append(dt)
                self.last_scrape = body
                if not ok or dt > 2:
                    self.scrape_failures.append(f"status/body/slow at {dt:.2f}s")
            except OSError as e:
                self.scrape_failures.append(f"{type(e).__name__}: {e}")

    def run(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        threads = [
            threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]
        threads += [
            threading.Thread(target=self.sample_rss, daemon=True),
            threading.Thread(target=self.poll_metrics, daemon=True),
        ]
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        for t in threads:
            t.join(60)


def _handled(scrape: str, method: str, code: str) -> float:
    for line in scrape.splitlines():
        if (
            line.startswith("grpc_server_handled_total{")
            and f'grpc_method="{method}"' in line
            and f'grpc_code="{code}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_load(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """32 Infer clients and a training job for CNND_LOAD_SECONDS: only OK (or
    RESOURCE_EXHAUSTED), RSS growth after warm-up < 50 MiB, /metrics within 2 s every second,
    and the job advancing throughout."""
    x, y = digits
    mport = free_port()
    server = ServerProcess(tmp_path / "data", "--metrics-port", str(mport))
    try:
        server.wait_ready(180)
        with server.client(timeout=120) as c:
            c.create_model(SMALL_SPEC, name="m")
            c.create_model(SMALL_SPEC, name="t", seed=1)
            c.upload_dataset(x, y, name="d")
            assert c.train("m", "d", epochs=1).wait(progress=False, timeout=300).state == (
                "SUCCEEDED"
            )
            job = c.train("t", "d", epochs=10_000, batch_size=32)
            load = Load(server.target, f"http://127.0.0.1:{mport}/metrics", server.proc.pid, x)
            load.run(SECONDS)
            during = c.get_job(job.id)
            assert during.state == "RUNNING", during.failure_reason
            c.cancel_job(job.id)
        final = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        alive = server.proc.poll() is None
    finally:
        server.close()

    ok = load.codes.get("OK", 0)
    after = [mib for t, mib in load.rss if t >= WARMUP]
    baseline = after[0] if after else float("nan")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        "seconds": SECONDS,
        "clients": CLIENTS,
        "codes": load.codes,
        "infer_per_second": ok / SECONDS,
        "latency_ms": {
            "p50": 1000 * percentile(load.latencies, 50),
            "p99": 1000 * percentile(load.latencies, 99),
            "max": 1000 * max(load.latencies, default=float("nan")),
        },
        "rss_mib": {
            "min": min(m for _, m in load.rss),
            "max": max(m for _, m in load.rss),
            "after_warmup": baseline,
            "growth_after_warmup": max(after) - baseline,
        },
        "metrics_scrapes": len(load.scrapes),
        "metrics_seconds_max": max(load.scrapes, default=float("nan")),
        "job_epochs_done": len(during.history),
    }
    print(json.dumps(report, indent=1))
    if os.environ.get("CNND_LOAD_REPORT"):
        Path(os.environ["CNND_LOAD_REPORT"]).write_text(json.dumps(report, indent=1))

    assert alive, "the server died under load"
    assert set(load.codes) <= {c.name for c in ALLOWED}, load.codes
    assert ok > CLIENTS * SECONDS / 10, f"only {ok} calls served in {SECONDS} s"
    assert report["rss_mib"]["growth_after_warmup"] < 50, report["rss_mib"]
    assert load.scrape_failures == [], load.scrape_failures[:5]
    assert len(load.scrapes) >= SECONDS * 0.8, "a /metrics poll was missed"
    assert during.progress.epoch >= 2, "the training job did not advance under load"
    counted = _handled(final.decode(), "Infer", "OK")
    assert counted == ok, f"/metrics counted {counted} Infer calls; the clients made {ok}"
    assert re.search(r"cnnd_", final.decode()), "cnnd's own metrics are exported"
