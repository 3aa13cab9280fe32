"""The serving benchmark runs: a quick pass, checked for shape and sanity, not for speed
(speed is measured by running it on a quiet machine, see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_serving_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    subprocess.run(
        [sys.executable, str(BENCH / "serve.py"), "--quick", "--no-cold-start", "--json", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert set(r["sweep"]) == {"no_batching", "batching", "grpc_echo"}
    for mode, points in r["sweep"].items():
        assert [p["clients"] for p in points] == [1, 4, 16, 64], mode
        for p in points:
            assert p["errors"] == 0 and p["requests_per_s"] > 0, (mode, p)
            assert 0 < p["p50_ms"] <= p["p99_ms"], (mode, p)
    assert {int(b) for b in r["in_process"]} == {1, 4, 16, 64}
