"""Generates the gRPC stubs in offloadd/v1/ from ../proto (never edit those files by hand).

    python gen_proto.py           # regenerate
    python gen_proto.py --check   # exit 1 if the committed stubs differ from a fresh generation

The stubs import themselves as ``offloadd.v1``, which is exactly where they live inside this
package, so no import rewriting is needed. Needs grpcio-tools (see requirements-test.txt).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "proto"
PROTO = "offloadd/v1/offloadd.proto"
OUTPUTS = ["offloadd_pb2.py", "offloadd_pb2.pyi", "offloadd_pb2_grpc.py"]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO}")


def differences() -> list[str]:
    """Names of the stub files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "offloadd" / "v1"
        return [
            name
            for name in OUTPUTS
            if not (HERE / "offloadd" / "v1" / name).exists()
            or not filecmp.cmp(fresh / name, HERE / "offloadd" / "v1" / name, shallow=False)
        ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    if ap.parse_args().check:
        stale = differences()
        if stale:
            print(f"stale stubs {stale}: run `python gen_proto.py` and commit", file=sys.stderr)
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
