"""The protos stand alone and pass buf's STANDARD lint; the committed generated code matches
them and was written by the pinned generator.

* `protoc -I protos` compiles every proto (the imports are vendored under protos/);
* the vendored copies define the same messages as the Python modules the server uses;
* buf lint (Google API style: one request and one response message per RPC, enum prefixes...)
  and buf format."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT, need_program

PROTOS = ROOT / "protos"
ALL_PROTOS = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(PROTOS / "generate.py"), "--out", str(tmp_path)], check=True
    )
    fresh = sorted(p.name for p in (tmp_path / "cnnd" / "v1").iterdir())
    committed = sorted(
        p.name for p in (PROTOS / "cnnd" / "v1").iterdir() if p.suffix in (".py", ".pyi")
        and p.name != "__init__.py"
    )  # fmt: skip
    assert fresh == committed
    stale = [n for n in fresh if not filecmp.cmp(tmp_path / "cnnd/v1" / n, PROTOS / "cnnd/v1" / n,
                                                 shallow=False)]  # fmt: skip
    assert not stale, f"run `python protos/generate.py`; stale: {stale}"


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every proto under protos/, compiled by the system's protoc with `-I protos` alone."""
    protoc = need_program("protoc")
    out = tmp_path / "all.pb"
    run = subprocess.run([protoc, "-I", str(PROTOS), f"--descriptor_set_out={out}", *ALL_PROTOS],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_protoc_needs_only_the_protos_directory(tmp_path: Path) -> None:
    files = {f.name for f in _descriptor_set(tmp_path).file}
    assert {"cnnd/v1/service.proto", "google/rpc/status.proto",
            "grpc/health/v1/health.proto"} <= files  # fmt: skip


@pytest.mark.parametrize(
    "module", ["google.rpc.status_pb2", "google.rpc.error_details_pb2", "grpc_health.v1.health_pb2"]
)
def test_vendored_protos_match_the_runtime_modules(tmp_path: Path, module: str) -> None:
    """A client built from protos/ speaks the same messages as the server's Python modules."""
    import importlib

    runtime = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(module).DESCRIPTOR.CopyToProto(runtime)
    names = {m.name for m in runtime.message_type}
    files = _descriptor_set(tmp_path).file
    (vendored,) = (f for f in files if {m.name for m in f.message_type} == names)
    for file in (vendored, runtime):  # protoc fills in json_name; the runtime's copy leaves it
        for message in file.message_type:
            _clear_json_names(message)
    assert list(vendored.message_type) == list(runtime.message_type)
    assert list(vendored.service) == list(runtime.service)


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def test_buf_lint_and_format() -> None:
    buf = need_program("buf")
    lint = subprocess.run([buf, "lint"], cwd=PROTOS, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([buf, "format", "--diff", "--exit-code", "--path", "cnnd"], cwd=PROTOS,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert fmt.returncode == 0, "run `buf format -w protos/cnnd`:\n" + fmt.stdout
