"""Which layer may import which: the contracts in pyproject.toml (import-linter), the
stand-alone vz-runtime package, and what the CLI loads before its first request."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold(capsys: pytest.CaptureFixture[str]) -> None:
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "0 broken" in out


@pytest.mark.skipif(
    importlib.util.find_spec("vzkit_runtime") is None, reason="vzkit_runtime is not there yet"
)
def test_the_runtime_imports_nothing_of_vzkit() -> None:
    import grimp

    graph = grimp.build_graph("vzkit_runtime", include_external_packages=True)
    offenders = sorted(
        (importer, imported)
        for importer in graph.modules
        if importer.startswith("vzkit_runtime")
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported == "vzkit" or imported.startswith("vzkit.")
    )
    assert offenders == []


def test_the_cli_starts_without_pydantic_websockets_or_the_server() -> None:
    code = (
        "import sys, vzkit.cli.main\n"
        "heavy = ('pydantic', 'websockets', 'fastapi', 'vzkit.server', 'vzkit.engines')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
