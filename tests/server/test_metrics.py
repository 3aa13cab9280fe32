"""Metrics checked by a real Prometheus server scraping a running cnnd, plus the deploy files:
promtool accepts the scrape config and alert rules, and every query of the Grafana dashboard
names a metric cnnd exports."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnd.client import Client, NotFound
from cnnd.core import stratified_split
from tests.conftest import ROOT, SMALL_SPEC, free_port, need_program, wait_for

DEPLOY = ROOT / "deploy"
INFER = 'grpc_server_handled_total{grpc_method="Infer",grpc_code="OK"}'


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[object, str, int]]:
    """An in-process server with /metrics on a free port: (server, target, metrics port)."""
    from cnnd.server.app import create_server
    from cnnd.server.config import ServerConfig

    mport = free_port()
    srv, port = create_server(
        ServerConfig(port=0, data_dir=str(tmp_path / "data"), metrics_port=mport)
    )
    srv.start()
    try:
        yield srv, f"127.0.0.1:{port}", mport
    finally:
        srv.stop(5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def exported_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}  # fmt: skip


def exercise(
    target: str, digits: tuple[np.ndarray, np.ndarray], infers: int, epochs: int = 3
) -> str:
    """Some RPCs, an error and a finished training job; returns the job id."""
    x, y = digits
    with Client(target) as c:
        c.wait_until_ready(60)
        model = c.create_model(SMALL_SPEC, name="m")
        data = c.upload_dataset(x[:512], y[:512], name="d")
        job = c.train(model, data, epochs=epochs, batch_size=16, lr=0.05, validation=0.2)
        assert job.wait(progress=False).state == "SUCCEEDED"
        for _ in range(infers):
            c.infer(model, x[:4])
        with pytest.raises(NotFound):
            c.get_model("missing")
        return job.id


def test_metrics_endpoint_has_every_family(metered, digits) -> None:  # type: ignore[no-untyped-def]
    _, target, mport = metered
    exercise(target, digits, infers=3)
    text = scrape(mport)
    names = exported_names(text)
    for name in (
        "grpc_server_started_total", "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket", "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total", "cnnd_inference_requests_total",
        "cnnd_inference_samples_total", "cnnd_inference_batch_size_bucket",
        "cnnd_inference_compute_seconds_bucket", "cnnd_training_samples_total",
        "cnnd_training_step_seconds_bucket", "cnnd_jobs_finished_total",
        "cnnd_job_duration_seconds_bucket", "cnnd_models", "cnnd_model_versions",
        "cnnd_datasets", "cnnd_store_bytes", "cnnd_jobs", "cnnd_kernel_compile_seconds",
        "process_resident_memory_bytes", "python_info",
    ):  # fmt: skip
        assert name in names, name
    assert re.search(r'^grpc_server_handled_total\{.*grpc_code="NOT_FOUND".*grpc_method="GetModel"',
                     text, re.M)  # fmt: skip
    assert 'cnnd_jobs{state="SUCCEEDED"} 1.0' in text
    train, _ = stratified_split(digits[1][:512], 0.2, 0)  # the job's split (seed 0)
    assert re.search(rf"^cnnd_training_samples_total {3 * len(train)}\.0$", text, re.M)
    # Per-job series exist only while the job runs.
    assert "cnnd_job_loss{" not in text
    for line in text.splitlines():
        if line.startswith("# HELP"):
            assert len(line.split(" ", 3)) == 4, f"no HELP text: {line}"


def test_real_prometheus_scrapes_cnnd(metered, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    binary = need_program("prometheus")
    _, target, mport = metered
    pport = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 250ms}\n"
        "scrape_configs:\n"
        f"  - job_name: cnnd\n    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{pport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{pport}/api/v1/query?query="

    def query(q: str) -> list[dict]:  # type: ignore[type-arg]
        try:
            with urllib.request.urlopen(api + urllib.parse.quote(q), timeout=5) as r:
                return json.loads(r.read())["data"]["result"]
        except OSError:
            return []

    try:
        wait_for(lambda: query('up{job="cnnd"} == 1'), timeout=60, what="Prometheus scraping")
        infers = 17
        job_id = exercise(target, digits, infers, epochs=30)  # long enough to be scraped
        scrape_done = time.time()

        def settled() -> list[dict]:  # type: ignore[type-arg]
            rows = query(INFER)
            fresh = rows and float(rows[0]["value"][0]) > scrape_done + 1
            return rows if fresh else []

        rows = wait_for(settled, timeout=30, interval=0.5, what="a scrape after the RPCs")
        assert float(rows[0]["value"][1]) == infers
        assert float(query("sum(cnnd_inference_samples_total)")[0]["value"][1]) == infers * 4
        assert float(query('cnnd_jobs_finished_total{state="SUCCEEDED"}')[0]["value"][1]) == 1
        # Store gauges are cached for a few seconds between scrapes.
        wait_for(lambda: query('cnnd_jobs{state="SUCCEEDED"} == 1'), timeout=30, interval=0.5,
                 what="the store gauges")  # fmt: skip
        failed = query('grpc_server_handled_total{grpc_method="GetModel",grpc_code="NOT_FOUND"}')
        assert float(failed[0]["value"][1]) == 1
        # While the job ran, Prometheus saw its progress series; they are gone now.
        seen = query(f'max_over_time(cnnd_job_epoch{{job_id="{job_id}"}}[5m])')
        assert seen and float(seen[0]["value"][1]) >= 1
        assert query(f'cnnd_job_epoch{{job_id="{job_id}"}}') == []
    finally:
        proc.terminate()
        proc.wait(10)


def test_promtool_accepts_deploy_files() -> None:
    promtool = need_program("promtool")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):  # fmt: skip
        r = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "max_over_time", "le", "without",
    "avg", "max", "min", "count", "on", "ignoring", "and", "or", "unless",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers not inside {...} or [...], not a
    function, keyword or label)."""
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    stripped = re.sub(r"\bby\s*\([^)]*\)", " ", stripped)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d.*", w)}


def test_dashboard_queries_name_exported_metrics(metered, digits) -> None:  # type: ignore[no-untyped-def]
    _, target, mport = metered
    exercise(target, digits, infers=1)
    exported = exported_names(scrape(mport))
    exported |= {"up"}
    # Per-job gauges exist only while a job runs; the scrape above happened after it ended.
    exported |= {"cnnd_job_progress_ratio", "cnnd_job_loss", "cnnd_job_accuracy",
                 "cnnd_job_val_accuracy", "cnnd_job_epoch"}  # fmt: skip
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "cnnd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    exprs += re.findall(r"expr: \|?\n?((?:.*\n)*?)\s+(?:for|labels):", rules)
    for expr in exprs:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{expr!r} names metrics cnnd does not export: {unknown}"
