"""Every benchmark command line the README shows runs as written, and every benchmark
script starts as a file and as a module (with --help: nothing is measured)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def readme_commands() -> list[str]:
    """The README's benchmark command lines: code spans that run a benchmarks/ script."""
    spans = re.findall(r"`([^`\n]+)`", (REPO / "README.md").read_text())
    return [s for s in spans if re.search(r"benchmarks/\w+\.py|-m benchmarks\.\w+", s)]


def _help(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run([*argv, "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shlex.join(argv)} (in {cwd}): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("usage:"), proc.stdout
    return proc.stdout


def test_the_readme_shows_a_benchmark_command() -> None:
    assert readme_commands(), "the README's Benchmarks section lost its example"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_benchmark_command_runs_as_written(command: str) -> None:
    _help(shlex.split(command), REPO)


def test_every_benchmark_starts_as_a_file_and_as_a_module(tmp_path: Path) -> None:
    # As files from elsewhere than the repository: only the script's own folder is on
    # sys.path then. As a module (`python -m benchmarks.NAME`, from the repository root),
    # the package is importable anyway: one is enough to show that form still works.
    runs = [([sys.executable, str(p)], tmp_path) for p in SCRIPTS]
    runs.append(([sys.executable, "-m", "benchmarks.boot"], REPO))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda run: _help(*run), runs))
