"""Server configuration: one dataclass, filled from flags, with environment variables
(CNND_<FLAG>) as defaults, so containers and Kubernetes configure it without a command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from cnnd.core.spec import SpecLimits

MiB = 1 << 20


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "cnnd")


@dataclass
class Limits:
    """Safe defaults; every one is a flag."""

    max_message_bytes: int = 64 * MiB
    max_parameters: int = 50_000_000
    max_activation_bytes: int = 256 * MiB  # per sample, float32, all layers
    max_dataset_bytes: int = 4096 * MiB
    max_infer_batch: int = 4096  # samples per Infer request
    max_concurrent_jobs: int = 1
    max_queued_jobs: int = 100
    max_concurrent_rpcs: int = 128  # calls of the API at once; more get RESOURCE_EXHAUSTED
    max_layers: int = 256

    def spec_limits(self) -> SpecLimits:
        return SpecLimits(
            max_layers=self.max_layers,
            max_parameters=self.max_parameters,
            max_activation_bytes=self.max_activation_bytes,
        )


@dataclass
class BatchingConfig:
    """Dynamic batching of Infer calls, as Triton does it: calls for the same model version
    arriving within ``max_queue_delay_us`` are run as one batch of at most ``max_batch_size``.
    Both are defaults: a model's own batching policy (UpdateModel) overrides them field by
    field. ``enabled=False`` turns batching off for every model, whatever its policy."""

    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 500


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = field(default_factory=default_data_dir)
    store: str = ""  # "" or "sqlite": the data dir; "postgresql://...": a shared PostgreSQL
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_host: str = ""  # default: same as host
    log_format: str = "text"  # or "json"
    log_level: str = "INFO"
    insecure: bool = False  # allow a non-loopback bind without authentication
    tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace_seconds: float = 20.0
    lease_seconds: float = 30.0
    worker_id: str = ""
    threads: int = 0  # RPC worker threads; at least max_concurrent_rpcs + a few for health
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    @staticmethod
    def env_name(name: str) -> str:
        return "CNND_" + name.upper()


def env_default(name: str, default: object) -> object:
    """The value of CNND_<NAME>, parsed like ``default``, or ``default``."""
    raw = os.environ.get(ServerConfig.env_name(name))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def flat_fields() -> list[tuple[str, object, str]]:
    """(flag name, default, group) for every setting, limits and batching included."""
    out: list[tuple[str, object, str]] = []
    for f in fields(ServerConfig):
        if f.name in ("limits", "batching"):
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out.append((f.name, default, ""))
    for f in fields(Limits):
        out.append((f.name, f.default, "limits"))
    for f in fields(BatchingConfig):
        out.append((f"batching_{f.name}", f.default, "batching"))
    return out
