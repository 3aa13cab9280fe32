"""The committed generated code matches the protos, and the protos pass buf's STANDARD lint
(Google API style: one request and one response message per RPC, enum prefixes, ...)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import google.rpc.status_pb2

from tests.conftest import ROOT, need_program

PROTOS = ROOT / "protos"


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


def _workspace(tmp_path: Path) -> Path:
    """A buf workspace: our protos, plus google/rpc/status.proto from googleapis-common-protos
    (which buf would otherwise fetch from the network)."""
    ws = tmp_path / "ws"
    shutil.copytree(PROTOS / "cnnd", ws / "protos" / "cnnd",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))  # fmt: skip
    rpc = Path(google.rpc.status_pb2.__file__).parent
    (ws / "third_party" / "google" / "rpc").mkdir(parents=True)
    shutil.copy(rpc / "status.proto", ws / "third_party" / "google" / "rpc")
    (ws / "buf.yaml").write_text(
        "version: v2\nmodules:\n  - path: protos\n    lint:\n      use: [STANDARD]\n"
        "  - path: third_party\n"
    )
    return ws


def test_buf_lint_and_format(tmp_path: Path) -> None:
    buf = need_program("buf")
    ws = _workspace(tmp_path)
    lint = subprocess.run(
        [buf, "lint", "protos"], cwd=ws, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([buf, "format", "--diff", "--exit-code", str(PROTOS)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert fmt.returncode == 0, "run `buf format -w protos`:\n" + fmt.stdout
