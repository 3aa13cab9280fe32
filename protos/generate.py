"""Regenerate the Python code for protos/cnnd/v1/*.proto next to the sources.

The generated modules are committed (so a plain `pip install` needs no protoc) and import as
`cnnd.v1.*_pb2`. tests/test_protos.py runs this into a temporary directory and fails when the
committed files differ, so the two never drift apart.

    python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent


def include_dirs() -> list[str]:
    """protoc include paths: our protos, protobuf's well-known types, googleapis' google/rpc."""
    import google.rpc.status_pb2
    import grpc_tools

    well_known = resources.files(grpc_tools) / "_proto"
    googleapis = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    return [str(HERE), str(well_known), str(googleapis)]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "cnnd" / "v1").glob("*.proto"))
    args = ["protoc", *(f"-I{d}" for d in include_dirs())]
    args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output root (default: protos/)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
