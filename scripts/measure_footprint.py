"""Start `tokenforge up` twice on one data dir (first start, then a warm restart) and print
the wall time until healthy and the resident memory of the whole idle stack, PostgreSQL
included. Usage: python scripts/measure_footprint.py"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.stackproc import start_stack  # noqa: E402


def stack_rss_mb(stack) -> tuple[float, float, int]:
    procs = [psutil.Process(stack.proc.pid), *stack.children()]
    pgdata = str((stack.data_dir / "pg").resolve())
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and p not in procs:
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if pgdata in cmd or (p.parent() and pgdata in " ".join(p.parent().cmdline())):
                    procs.append(p)
            except psutil.Error:
                pass
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += info.pss  # shared pages (libpython, grpc, PostgreSQL's shared buffers) counted once
    return rss / 2**20, pss / 2**20, len(procs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        for label in ("first start", "restart"):
            stack = start_stack(data)
            try:
                rss, pss, n = stack_rss_mb(stack)
                print(f"{label:12} healthy after {stack.started_s:5.2f} s   idle memory: PSS {pss:6.1f} MiB "
                      f"(RSS summed {rss:6.1f} MiB) in {n} processes")
            finally:
                stack.stop()


if __name__ == "__main__":
    main()
