"""Regenerate libs/tokenforge/v1 from protos/ with grpcio-tools.

Usage: python scripts/gen_protos.py [--out DIR]
The test tests/unit/test_protos_generated.py runs this into a temporary folder and fails when
the result differs from what is checked in.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "libs"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "tokenforge" / "v1"
    (out_dir / "__init__.py").touch()
    return sorted(out_dir.glob("*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    files = generate(ns.out)
    print(f"generated {len(files)} files under {ns.out / 'tokenforge' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
