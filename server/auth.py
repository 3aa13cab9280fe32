"""Bearer-token authentication with two roles, and the rule about where the server may listen.

Tokens come from a file (``--tokens-file``: one ``ROLE TOKEN`` per line, ``#`` comments) and/or
the environment (``CNND_ADMIN_TOKEN``, ``CNND_INFER_TOKEN``; comma-separated for several).
``admin`` may do everything; ``infer`` may read: Infer, InferStream, Inspect, Get*, List*,
WatchJob and ExportModel (``READ_METHODS``). The methods that change something
(``ADMIN_METHODS``) need ``admin``, as does any method that is in neither set (a test checks
that every method of the service is in exactly one). Tokens are compared in constant time, and
every configured token is compared, so the time taken does not reveal which one nearly matched.

The gRPC health service stays open (Kubernetes probes send no metadata), as does reflection,
which only describes the public API.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cnnd.server.rpc import rebuild

log = logging.getLogger("cnnd.server")

SERVICE_PREFIX = "/cnnd.v1.CnndService/"
ROLES = ("admin", "infer")
READ_METHODS = frozenset(
    {
        "Infer", "InferStream", "Inspect", "GetModel", "ListModels", "GetDataset",
        "ListDatasets", "GetJob", "ListJobs", "WatchJob", "ExportModel",
    }
)  # fmt: skip
ADMIN_METHODS = frozenset(
    {
        "CreateModel", "UpdateModel", "DeleteModel", "ImportModel", "UploadDataset",
        "DeleteDataset", "Train", "CancelJob",
    }
)  # fmt: skip


class AuthConfigError(ValueError):
    """The tokens configuration is unusable (unreadable file, unknown role, short token)."""


@dataclass
class Tokens:
    """Configured tokens, kept as SHA-256 digests (equal length, compared in constant time)."""

    digests: list[tuple[bytes, str]] = field(default_factory=list)  # (digest, role)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def add(self, role: str, token: str, where: str) -> None:
        if role not in ROLES:
            raise AuthConfigError(f"{where}: unknown role {role!r}; roles are admin and infer")
        if len(token) < 16:
            raise AuthConfigError(f"{where}: tokens must be at least 16 characters")
        self.digests.append((hashlib.sha256(token.encode()).digest(), role))

    def role(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, role in self.digests:  # no early exit: constant time over all tokens
            if hmac.compare_digest(known, digest) and found is None:
                found = role
        return found


def load_tokens(tokens_file: str = "", environ: dict[str, str] | None = None) -> Tokens:
    env = os.environ if environ is None else environ
    tokens = Tokens()
    if tokens_file:
        try:
            text = Path(tokens_file).read_text()
        except OSError as e:
            raise AuthConfigError(f"cannot read tokens file {tokens_file}: {e}") from e
        for n, raw in enumerate(text.splitlines(), start=1):
            parts = raw.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AuthConfigError(f"{tokens_file}:{n}: expected 'ROLE TOKEN'")
            tokens.add(parts[0], parts[1], f"{tokens_file}:{n}")
    for role in ROLES:
        for token in filter(None, env.get(f"CNND_{role.upper()}_TOKEN", "").split(",")):
            tokens.add(role, token.strip(), f"CNND_{role.upper()}_TOKEN")
    return tokens


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def check_bind(host: str, tokens: Tokens, insecure: bool) -> None:
    """Refuse a non-loopback bind without authentication, unless explicitly --insecure."""
    if is_loopback(host) or tokens.enabled:
        return
    if not insecure:
        raise AuthConfigError(
            f"refusing to listen on {host or 'all interfaces'} without authentication: anyone "
            "who can reach it could train and delete models. Configure tokens (--tokens-file, "
            "CNND_ADMIN_TOKEN) or pass --insecure to accept the risk."
        )
    log.warning(
        "!!! INSECURE: listening on %s WITHOUT AUTHENTICATION (--insecure). Anyone who can "
        "reach this port can create, train, delete and read every model and dataset. !!!",
        host or "all interfaces",
    )


def _denied(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> Any:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return rebuild(handler, abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED without a valid token; PERMISSION_DENIED when its role is too small."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        name = method[len(SERVICE_PREFIX) :]
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        role = self.tokens.role(token.strip()) if scheme.lower() == "bearer" else None
        if role is None:
            log.info("rpc failed", extra={"method": name, "code": "UNAUTHENTICATED"})
            return _denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid token: send 'authorization: Bearer <token>'",
                handler,
            )
        if role != "admin" and name not in READ_METHODS:
            log.info("rpc failed", extra={"method": name, "code": "PERMISSION_DENIED"})
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs the admin role; this token has the {role} role",
                handler,
            )
        return handler
