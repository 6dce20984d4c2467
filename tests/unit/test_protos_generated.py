"""The generated code that services import must be exactly what the protos generate."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checked_in_code_matches_the_protos(tmp_path: pathlib.Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh_dir = tmp_path / "tokenforge" / "v1"
    checked_dir = ROOT / "libs" / "tokenforge" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    checked = {p.name: p.read_bytes() for p in checked_dir.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(checked), "generated file set differs: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != checked[name]]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"


def test_every_proto_enum_has_an_unspecified_zero() -> None:
    from tokenforge.v1 import common_pb2

    for enum in common_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
