"""Serving benchmark: single-sample Infer over loopback gRPC at 1, 4, 16 and 64 concurrent
clients, with and without dynamic batching, beside the in-process engine's own rate at the
same batch sizes (the ceiling), and the server's cold start.

    python bench/serve.py [--quick] [--model lenet|cifar] [--seconds 3] [--repeats 3]
                          [--json out.json]

The same sweep also runs against a gRPC echo: a server built the same way (grpcio, the same
thread pool and message options) whose Infer answers every call with one fixed response and
does nothing else. It is the ceiling that Python gRPC itself sets on this machine, so the
table shows cnnd against both the engine's rate and the transport's.

Clients run in separate processes (``--client-procs``, default 2) with threads inside, so the
client's own GIL is not what is measured; they share the machine's cores with the server, as
a sidecar would.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import CIFAR, LENET5  # noqa: E402  (the same models as the engine benchmark)

CONCURRENCY = (1, 4, 16, 64)


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_server(port: int) -> None:
    """Serve the transport ceiling: Infer answers a fixed, valid InferResponse (bytes in,
    bytes out: no protobuf parsing, no engine), on a server configured as cnnd's is."""
    from concurrent import futures

    import grpc

    from cnnd.server.app import HEALTH_RESERVE, grpc_options
    from cnnd.server.config import ServerConfig
    from cnnd.server.convert import infer_response

    config = ServerConfig(port=port)
    reply = infer_response("bench", 1, np.zeros((1, 10), np.float32)).SerializeToString()
    methods = {"Infer": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)}
    workers = max(config.threads, config.limits.max_concurrent_rpcs + HEALTH_RESERVE)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=grpc_options(config))  # fmt: skip
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cnnd.v1.CnndService", methods),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start_echo() -> tuple[subprocess.Popen[bytes], str]:
    """echo_server in a child process, once it answers."""
    from cnnd.client import Client

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)])
    target = f"127.0.0.1:{port}"
    x = np.zeros((1, 1, 28, 28), np.float32)
    with Client(target, timeout=2, retries=0) as c:
        deadline = time.monotonic() + 30
        while True:
            try:
                c.infer("bench", x)
                return proc, target
            except Exception:  # not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError("the echo server did not start") from None
                time.sleep(0.05)


def start_server(
    data_dir: Path, batching: bool, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    """`cnnd serve` in a child process; (process, target, seconds to SERVING)."""
    from cnnd.client import Client

    port = free_port()
    cmd = [sys.executable, "-m", "cnnd.client.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), "--log-level", "WARNING",
           "--batching-enabled" if batching else "--no-batching-enabled"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    target = f"127.0.0.1:{port}"
    with Client(target, timeout=2, retries=0) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    break
            except Exception:  # not up yet
                pass
            if proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.01)
    return proc, target, time.perf_counter() - t0


def _client_proc(target: str, model: str, shape: tuple[int, ...], threads: int, seconds: float,
                 queue: Any) -> None:  # fmt: skip
    from cnnd.client import Client

    x = np.random.default_rng(os.getpid()).random((1, *shape), dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        with Client(target, timeout=30, retries=0) as c:
            c.infer(model, x)  # connect and warm
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    c.infer(model, x)
                    latencies[i].append(time.perf_counter() - t)
                except Exception:  # counted, not fatal
                    errors[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    stop_at[0] = time.perf_counter() + seconds
    for t in ts:
        t.join()
    queue.put(([v for lat in latencies for v in lat], sum(errors)))


def sweep_point(target: str, model: str, shape: tuple[int, ...], clients: int, procs: int,
                seconds: float) -> dict[str, float]:  # fmt: skip
    procs = min(procs, clients)
    q: Any = mp.get_context("spawn").Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [mp.get_context("spawn").Process(target=_client_proc,
                                          args=(target, model, shape, n, seconds, q))
          for n in per]  # fmt: skip
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    lat = sorted(v for r in results for v in r[0])
    errors = sum(r[1] for r in results)
    n = len(lat)
    return {
        "clients": clients,
        "requests_per_s": n / seconds,
        "p50_ms": 1e3 * lat[n // 2] if n else float("nan"),
        "p99_ms": 1e3 * lat[min(n - 1, int(n * 0.99))] if n else float("nan"),
        "errors": errors,
    }


def median_point(windows: list[dict[str, float]]) -> dict[str, float]:
    """One sweep point from several windows: the median of each figure (errors: the sum)."""
    out = {k: statistics.median(w[k] for w in windows) for k in windows[0]}
    out["errors"] = sum(w["errors"] for w in windows)
    out["windows"] = len(windows)
    return out


def in_process_rate(spec: dict[str, Any], batch: int, seconds: float) -> tuple[float, float]:
    """(samples/s, median ms per call) of the engine's forward pass at ``batch``."""
    from cnnd.core import Sequential

    model = Sequential.from_spec(spec, seed=0)
    x = np.random.default_rng(0).random((batch, *spec["input_shape"]), dtype=np.float32)
    for _ in range(5):
        model.forward(x)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t = time.perf_counter()
        model.forward(x)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return batch / med, med * 1e3


def prepare(target: str, spec: dict[str, Any], name: str, tmp: Path) -> None:
    """A model with weights (imported: Infer needs a version)."""
    from cnnd.client import Client
    from cnnd.core import Sequential, save_model

    path = tmp / f"{name}.npz"
    save_model(path, Sequential.from_spec(spec, seed=0))
    with Client(target) as c:
        c.import_model(path, name=name)


def cold_start(tmp: Path) -> dict[str, float]:
    """Seconds from process start to SERVING, with an empty and with a warm kernel cache."""
    cache = tmp / "numba-cold"
    out = {}
    for label in ("empty_cache", "warm_cache"):
        proc, _, seconds = start_server(
            tmp / f"cold-{label}", True, {"NUMBA_CACHE_DIR": str(cache)}
        )
        proc.terminate()
        proc.wait(30)
        out[label] = seconds
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet", "cifar"], default="lenet")
    parser.add_argument("--seconds", type=float, default=3.0, help="per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per point (median)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    spec = LENET5 if args.model == "lenet" else CIFAR
    seconds = 1.5 if args.quick else args.seconds
    repeats = 1 if args.quick else args.repeats
    shape = tuple(spec["input_shape"])
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "model": args.model,
        "seconds_per_point": seconds,
        "repeats": repeats,
        "sweep": {},
    }
    with tempfile.TemporaryDirectory(prefix="cnnd-bench-") as d:
        tmp = Path(d)
        ceiling = {b: in_process_rate(spec, b, seconds / 2) for b in CONCURRENCY}
        results["in_process"] = {
            b: {"samples_per_s": r, "ms": ms} for b, (r, ms) in ceiling.items()
        }
        for mode in ("no_batching", "batching", "grpc_echo"):
            if mode == "grpc_echo":
                proc, target = start_echo()
            else:
                proc, target, _ = start_server(tmp / f"data-{mode}", mode == "batching")
            try:
                if mode != "grpc_echo":
                    prepare(target, spec, "bench", tmp)
                points = [median_point([sweep_point(target, "bench", shape, n,
                                                    args.client_procs, seconds)
                                        for _ in range(repeats)])
                          for n in CONCURRENCY]  # fmt: skip
            finally:
                proc.terminate()
                proc.wait(30)
            results["sweep"][mode] = points
        if not (args.quick or args.no_cold_start):
            results["cold_start_s"] = cold_start(tmp)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(r: dict[str, Any]) -> None:
    print(f"cnnd serving benchmark - {r['date']} - {r['machine']}, {r['cores']} cores - "
          f"model {r['model']}, median of {r['repeats']} windows of {r['seconds_per_point']} s "
          "per point")  # fmt: skip
    head = (f"{'clients':>7} | {'mode':<11} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | "
            f"{'errors':>6} | {'in-proc samples/s @ batch':>26} | {'ratio':>5} | "
            f"{'of echo':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    echo = {p["clients"]: p for p in r["sweep"].get("grpc_echo", [])}
    for mode, points in r["sweep"].items():
        for p in points:
            b = p["clients"]
            ceil = r["in_process"][b]["samples_per_s"]
            e = echo.get(b)
            of_echo = f"{p['requests_per_s'] / e['requests_per_s']:>7.2f}" if e else f"{'':>7}"
            print(f"{b:>7} | {mode:<11} | {p['requests_per_s']:>8.0f} | {p['p50_ms']:>7.2f} | "
                  f"{p['p99_ms']:>7.2f} | {p['errors']:>6} | {ceil:>26.0f} | "
                  f"{p['requests_per_s'] / ceil:>5.2f} | {of_echo}")  # fmt: skip
    one = r["in_process"][1]["ms"]
    print(
        f"in-process batch-1 latency: {one:.3f} ms; ratio: req/s over the in-process rate at "
        "that batch size; of echo: over the gRPC echo's req/s at that concurrency"
    )
    if "cold_start_s" in r:
        c = r["cold_start_s"]
        print(f"cold start to SERVING: {c['warm_cache']:.2f} s with a warm kernel cache, "
              f"{c['empty_cache']:.1f} s with an empty one")  # fmt: skip


if __name__ == "__main__":
    main()
