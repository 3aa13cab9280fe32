"""`cnnd serve`: flags for every setting of ServerConfig, each defaulting to CNND_<NAME>."""

from __future__ import annotations

import argparse
from dataclasses import fields

from cnnd.server.config import BatchingConfig, Limits, ServerConfig, env_default, flat_fields

HELP = {
    "host": "address to bind; 127.0.0.1 unless authentication is configured",
    "port": "gRPC port (0: any free port)",
    "data_dir": "where the embedded store keeps its database and files",
    "store": "'sqlite' (default, in --data-dir) or a postgresql:// URL",
    "metrics_port": "serve Prometheus /metrics on this port (0: off)",
    "metrics_host": "address for /metrics (default: --host)",
    "log_format": "text or json",
    "insecure": "allow a non-loopback bind without authentication (logged loudly)",
    "tokens_file": "file of bearer tokens, one 'ROLE TOKEN' per line (roles: admin, infer)",
    "tls_cert": "server certificate (PEM) to serve TLS",
    "tls_key": "server private key (PEM)",
    "tls_client_ca": "CA (PEM) whose client certificates are required (mutual TLS)",
    "grace_seconds": "on SIGTERM, how long in-flight calls and jobs get to finish",
    "lease_seconds": "job lease; another replica may take over a job this long after its "
    "worker stops renewing",
    "worker_id": "name of this replica in job leases (default: host-pid)",
    "threads": "RPC worker threads (default: enough for --max-concurrent-rpcs and health)",
    "batching_enabled": "batch Infer calls (--no-batching-enabled: no model batches, whatever "
    "its own policy says)",
    "batching_max_batch_size": "most samples per forward pass, for models that set no "
    "max_batch_size of their own",
    "batching_max_queue_delay_us": "longest a batch waits for more calls (microseconds), for "
    "models that set no max_queue_delay_us of their own",
}


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    groups = {
        "": p.add_argument_group("server"),
        "limits": p.add_argument_group("limits"),
        "batching": p.add_argument_group("dynamic batching of Infer"),
    }
    for name, default, group in flat_fields():
        flag = "--" + name.replace("_", "-")
        value = env_default(name, default)
        env = ServerConfig.env_name(name)
        text = f"{HELP.get(name, name.replace('_', ' '))} (env {env}; default {default!r})"
        if isinstance(default, bool):
            g = groups[group]
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=value, help=text)  # fmt: skip
        else:
            groups[group].add_argument(flag, dest=name, type=type(default), default=value,
                                       help=text)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    top = {f.name: getattr(args, f.name) for f in fields(ServerConfig)
           if f.name not in ("limits", "batching")}  # fmt: skip
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    batching = BatchingConfig(
        **{f.name: getattr(args, f"batching_{f.name}") for f in fields(BatchingConfig)}
    )
    return ServerConfig(**top, limits=limits, batching=batching)


def run_serve(args: argparse.Namespace) -> int:
    from cnnd.server import logs
    from cnnd.server.app import serve

    config = config_from_args(args)
    logs.configure(config.log_format, config.log_level)
    return serve(config)
