"""The code passes the project's linter (ruff, pinned in the test extras), so the README's
test command and CI agree."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The project's own code; not the whole folder, where a user's scratch script (the README's
# client example saved as a file) would fail the suite.
CODE = ("libs", "services", "tests", "bench", "examples", "scripts")


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    paths = [str(ROOT / name) for name in CODE if (ROOT / name).exists()]
    out = subprocess.run([ruff, "check", "--no-cache", *paths], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
