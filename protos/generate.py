"""Regenerate the Python code for protos/cnnd/v1/*.proto next to the sources.

The generated modules are committed (so a plain `pip install` needs no protoc) and import as
`cnnd.v1.*_pb2`. tests/test_protos.py runs this into a temporary directory and fails when the
committed files differ, so the two never drift apart.

The generator is pinned: grpcio-tools GRPCIO_TOOLS, in an environment of its own (made once
under ~/.cache/cnnd). Generated code records the protoc that wrote it, and protobuf's runtime
refuses code newer than itself; so the older the generator, the more runtimes load the code.
1.66.0 (protoc 27, "gencode 5.27.2") is the oldest grpcio this package supports, and its code
loads on protobuf 5.27.2 and newer, 6.x and 7.x alike; see tests/test_floors.py.

Only cnnd's own protos are generated. Those under google/ and grpc/ are vendored copies of
what they import (so `protoc -I protos` needs nothing else); their Python modules come from
googleapis-common-protos and grpcio-health-checking, which own those descriptors.

    python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRPCIO_TOOLS = "1.66.0"


def protoc_python() -> Path:
    """A Python with grpcio-tools GRPCIO_TOOLS: this one if it has it, else a cached venv."""
    try:
        from importlib.metadata import version

        import grpc_tools  # noqa: F401

        if version("grpcio-tools") == GRPCIO_TOOLS:
            return Path(sys.executable)
    except ImportError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    env = cache / "cnnd" / f"grpcio-tools-{GRPCIO_TOOLS}"
    python = env / "bin" / "python"
    if not (env / "ok").exists():
        venv.create(env, with_pip=True, clear=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"grpcio-tools=={GRPCIO_TOOLS}"], check=True)  # fmt: skip
        (env / "ok").touch()
    return python


def generate(out: Path) -> None:
    python = protoc_python()
    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "cnnd" / "v1").glob("*.proto"))
    # The well-known types (google/protobuf/*.proto) ship with protoc; grpc_tools keeps them in
    # its _proto directory, which `python -m grpc_tools.protoc` adds on its own.
    args = [f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    run = subprocess.run([python, "-m", "grpc_tools.protoc", *args, *protos], cwd=HERE,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"protoc failed:\n{run.stdout}{run.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output root (default: protos/)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
