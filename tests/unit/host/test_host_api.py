"""vzkit.host imports nothing: light users (vz-runtime) must not pay for pydantic."""

from __future__ import annotations

import subprocess
import sys


def test_package_is_import_free() -> None:
    import vzkit.host

    assert not hasattr(vzkit.host, "__all__")


def test_cgroups_do_not_pull_in_pydantic() -> None:
    code = "import sys, vzkit.host.cgroups; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
