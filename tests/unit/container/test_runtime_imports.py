"""vz-runtime is a package of its own: it imports only the standard library (so it runs
where nothing but python3 is installed, as in the cgroup v2 guest test), and vzkit talks
to it through its command line only, never by importing it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import vzkit
import vzkit_runtime

RUNTIME_SRC = Path(vzkit_runtime.__file__).parent
VZKIT_SRC = Path(vzkit.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in the file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." if node.level else (node.module or "").split(".")[0]))
    return found


def test_runtime_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", "vzkit_runtime"}
    bad = [
        f"{path.relative_to(RUNTIME_SRC)}:{line}: {name}"
        for path in sorted(RUNTIME_SRC.rglob("*.py"))
        for line, name in _imports(path)
        if name not in allowed
    ]
    assert bad == [], "vzkit_runtime must import only the standard library:\n" + "\n".join(bad)


def test_vzkit_never_imports_the_runtime() -> None:
    bad = [
        f"{path.relative_to(VZKIT_SRC)}:{line}"
        for path in sorted(VZKIT_SRC.rglob("*.py"))
        for line, name in _imports(path)
        if name == "vzkit_runtime"
    ]
    assert bad == [], "vzkit talks to vz-runtime through its command line only:\n" + "\n".join(bad)


def test_runtime_runs_alone_in_an_isolated_python(tmp_path: Path) -> None:
    """A copy of the package, with nothing else on the path (python -IS, as the launcher
    starts it): every module imports and the CLI answers, and neither vzkit nor a
    third-party module is loaded."""
    shutil.copytree(RUNTIME_SRC, tmp_path / "vzkit_runtime", ignore=shutil.ignore_patterns("*.pyc"))
    code = (
        "import sys, pkgutil, importlib\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import vzkit_runtime\n"
        "for m in pkgutil.iter_modules(vzkit_runtime.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('vzkit_runtime.' + m.name)\n"
        "from vzkit_runtime.cli import main\n"
        "assert main(['features']) == 0\n"
        "assert main(['--root', sys.argv[1], 'state', 'ghost']) == 1\n"
        "own = set(sys.stdlib_module_names) | {'__main__', 'vzkit_runtime'}\n"
        "print('OUTSIDE', sorted(n for n in sys.modules if n.split('.')[0] not in own))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OUTSIDE []" in proc.stdout, proc.stdout
    assert "error: container 'ghost' does not exist" in proc.stderr


def test_hot_commands_stay_light() -> None:
    """What `run` and `exec` import on the way (see docs/architecture.md): no re, typing,
    json, subprocess or argparse: each costs milliseconds of every container's start."""
    code = (
        "import sys\n"
        "from vzkit_runtime import cli, runtime, control, execute, init, mounts, caps, "
        "cgroups, devices, state, spec\n"
        "print(sorted(m for m in ('re', 'typing', 'json', 'subprocess', 'argparse', "
        "'dataclasses', 'pathlib', 'signal', 'enum', 'logging') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(RUNTIME_SRC.parent)!r})\n" + code,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
