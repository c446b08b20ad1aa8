"""Regenerate proto/stamen_pb2.py from proto/stamen.proto (needs grpcio-tools, a hivemind dependency)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path = HERE) -> Path:
    """Run protoc on stamen.proto and return the path of the generated module."""
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", str(HERE / "stamen.proto")])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return out_dir / "stamen_pb2.py"


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
