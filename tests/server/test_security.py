"""Authentication, roles, TLS and the safe-bind rule, each proved over a real channel.

The role test walks the service descriptor, so a method added later cannot be forgotten.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnd.client import TLS, Client, Unauthenticated, Unavailable
from cnnd.server.app import create_server
from cnnd.server.auth import ADMIN_METHODS, READ_METHODS, AuthConfigError
from cnnd.server.config import ServerConfig
from cnnd.v1 import service_pb2
from tests.conftest import SMALL_SPEC, need_program

ADMIN = "admin-token-0123456789abcdef"
READER = "infer-token-0123456789abcdef"
SERVICE = service_pb2.DESCRIPTOR.services_by_name["CnndService"]


def _start(config: ServerConfig) -> tuple[object, int]:
    srv, port = create_server(config)
    srv.start()
    return srv, port


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[str]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# role token\nadmin {ADMIN}\ninfer {READER}  # the dashboards\n")
    srv, port = _start(ServerConfig(port=0, data_dir=str(tmp_path / "d"), tokens_file=str(tokens)))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(5)  # type: ignore[attr-defined]


def _call(channel: grpc.Channel, method, token: str | None) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Call ``method`` with an empty request; return the status code it ends with."""
    path = f"/{SERVICE.full_name}/{method.name}"
    request_cls = method.input_type._concrete_class
    response_cls = method.output_type._concrete_class
    kwargs = {"request_serializer": request_cls.SerializeToString,
              "response_deserializer": response_cls.FromString}  # fmt: skip
    metadata = [("authorization", f"Bearer {token}")] if token else []
    request = request_cls()
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path, **kwargs)(iter([request]), metadata=metadata,
                                                       timeout=10))  # fmt: skip
        elif method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            list(channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10))
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_method_needs_a_token_of_the_right_role(secured: str) -> None:
    methods = list(SERVICE.methods)
    assert len(methods) == 19
    # Every method has its role written down: read (infer) or change (admin), not both.
    names = {m.name for m in methods}
    assert names == READ_METHODS | ADMIN_METHODS and not READ_METHODS & ADMIN_METHODS
    with grpc.insecure_channel(secured) as channel:
        for method in methods:
            for token in (None, "wrong-token-0123456789abcdef", ADMIN[:-1]):
                code = _call(channel, method, token)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, token, code)
            code = _call(channel, method, READER)
            if method.name in READ_METHODS:
                assert code not in (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED), method.name  # fmt: skip
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, code)
            code = _call(channel, method, ADMIN)
            assert code not in (grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.PERMISSION_DENIED), method.name  # fmt: skip
        # Kubernetes probes send no metadata: health stays open.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status in (health.SERVING, health.NOT_SERVING)


def test_sdk_with_tokens(secured: str) -> None:
    with Client(secured, token=ADMIN) as admin, Client(secured, token=READER) as reader:
        admin.wait_until_ready(60)
        admin.create_model(SMALL_SPEC, name="m")
        assert [m.name for m in reader.list_models()] == ["m"]
        with pytest.raises(Exception, match="admin role") as info:
            reader.delete_model("m")
        assert info.value.code == "PERMISSION_DENIED"  # type: ignore[attr-defined]
    with Client(secured) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_models()


def test_tokens_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNND_ADMIN_TOKEN", ADMIN)
    srv, port = _start(ServerConfig(port=0, data_dir=str(tmp_path / "d")))
    try:
        with Client(f"127.0.0.1:{port}") as c, pytest.raises(Unauthenticated):
            c.list_models()
        with Client(f"127.0.0.1:{port}", token=ADMIN) as c:
            assert c.list_models() == []
    finally:
        srv.stop(5)  # type: ignore[attr-defined]


def test_bad_token_configuration_is_refused(tmp_path: Path) -> None:
    for text, message in (("root " + ADMIN, "unknown role"), ("admin short", "at least 16"),
                          ("admin", "ROLE TOKEN")):  # fmt: skip
        f = tmp_path / "tokens"
        f.write_text(text)
        with pytest.raises(AuthConfigError, match=message):
            create_server(ServerConfig(port=0, data_dir=str(tmp_path / "d"), tokens_file=str(f)))


def test_non_loopback_bind_needs_auth_or_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ServerConfig().host == "127.0.0.1"
    with pytest.raises(AuthConfigError, match="without authentication"):
        create_server(ServerConfig(host="0.0.0.0", port=0, data_dir=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists(), "a refused start must not touch the data dir"
    monkeypatch.setattr(logging.getLogger("cnnd"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="cnnd"):
        srv, _ = create_server(
            ServerConfig(host="0.0.0.0", port=0, data_dir=str(tmp_path / "b"), insecure=True)
        )
    srv.deps.store.close()  # type: ignore[attr-defined]
    assert "INSECURE" in caplog.text and "WITHOUT AUTHENTICATION" in caplog.text
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {ADMIN}\n")
    srv, _ = create_server(ServerConfig(host="0.0.0.0", port=0, data_dir=str(tmp_path / "c"),
                                        tokens_file=str(tokens)))  # fmt: skip
    srv.deps.store.close()  # type: ignore[attr-defined]


def test_serve_refuses_unsafe_bind_with_exit_code(tmp_path: Path) -> None:
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cnnd.client.cli", "serve", "--host", "0.0.0.0", "--port", "0",
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "refusing to listen" in r.stderr


# --- TLS -------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
             str(cert), "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return key, cert


def _leaf(d: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    need_program("openssl")
    d = tmp_path_factory.mktemp("pki")
    ca, other = _ca(d, "ca"), _ca(d, "other-ca")
    return {
        "ca": ca, "other": other,
        "server": _leaf(d, "server", ca, "DNS:localhost,IP:127.0.0.1"),
        "client": _leaf(d, "client", ca, "DNS:client"),
        "stranger": _leaf(d, "stranger", other, "DNS:client"),
    }  # fmt: skip


def test_tls_and_mutual_tls(tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    key, cert = pki["server"]
    ca = str(pki["ca"][1])
    srv, port = _start(ServerConfig(port=0, data_dir=str(tmp_path / "d"), tls_cert=str(cert),
                                    tls_key=str(key), tls_client_ca=ca))  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        # Plaintext to the TLS port fails.
        with Client(target, timeout=5, retries=0) as c, pytest.raises(Unavailable):
            c.list_models()
        # TLS without a client certificate fails (mutual TLS is required).
        with Client(target, tls=TLS(ca=ca), timeout=5, retries=0) as c, pytest.raises(Unavailable):
            c.list_models()
        # A client certificate from another CA fails.
        skey, scert = pki["stranger"]
        bad = TLS(ca=ca, cert=str(scert), key=str(skey))
        with Client(target, tls=bad, timeout=5, retries=0) as c, pytest.raises(Unavailable):
            c.list_models()
        # A good one works.
        ckey, ccert = pki["client"]
        good = TLS(ca=ca, cert=str(ccert), key=str(ckey))
        with Client(target, tls=good, timeout=10) as c:
            c.wait_until_ready(60)
            assert c.list_models() == []
    finally:
        srv.stop(5)  # type: ignore[attr-defined]


def test_server_tls_without_client_certificates(
    tmp_path: Path, pki: dict[str, tuple[Path, Path]]
) -> None:
    key, cert = pki["server"]
    srv, port = _start(ServerConfig(port=0, data_dir=str(tmp_path / "d"), tls_cert=str(cert),
                                    tls_key=str(key)))  # fmt: skip
    try:
        with Client(f"127.0.0.1:{port}", tls=TLS(ca=str(pki["ca"][1])), timeout=10) as c:
            c.wait_until_ready(60)
            assert c.list_models() == []
        # A client that does not trust the server's CA refuses to talk.
        with Client(f"127.0.0.1:{port}", tls=TLS(ca=str(pki["other"][1])), timeout=5,
                    retries=0) as c, pytest.raises(Unavailable):  # fmt: skip
            c.list_models()
    finally:
        srv.stop(5)  # type: ignore[attr-defined]
