"""Regenerate docs/performance.md: the engine and serving benchmarks, run now, on this machine.

    python bench/report.py [--quick]

Each benchmark runs in its own process and prints its tables; the page holds them verbatim
with the date and machine, so a reader sees exactly what was measured and how.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "performance.md"


def run(script: str, *args: str) -> str:
    cmd = [sys.executable, str(HERE / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke test)")
    args = parser.parse_args()
    flags = ["--quick"] if args.quick else []
    engine = run("engine.py", *flags)
    serve = run("serve.py", *flags)
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    command = "python bench/report.py" + (" --quick" if args.quick else "")
    OUT.write_text(
        f"""# Performance

Measured {date} on {cpu()}, {os.cpu_count()} cores, by `{command}`.
This machine is shared; every ratio compares figures taken in the same run, interleaved, and
each figure is a median of several windows (see bench/README.md for how to read them).

## Engine: cnnd vs PyTorch CPU (`bench/engine.py`)

```
{engine}
```

## Serving over loopback gRPC (`bench/serve.py`)

```
{serve}
```
"""
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
