"""The daemon: started by the CLI on demand, socket permissions, clean stop without the VMs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup, _make_daemon
from vzkit.models import InstanceCreate, InstanceState

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh(image_cache: Path) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="vzt-"))
    d = _make_daemon(root, image_cache)
    try:
        yield d
    finally:
        _cleanup(d)
        # A daemon the CLI started is not d.proc: stop it through the API.
        subprocess.run(
            [sys.executable, "-m", "vzkit.cli.main", "daemon", "stop"],
            env=d.env,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def vz(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vzkit.cli.main", *args],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_starts_the_daemon_and_stop_keeps_vms(fresh: Daemon) -> None:
    r = vz(fresh, "daemon", "status")
    assert r.returncode == 3 and "not running" in (r.stdout + r.stderr)
    r = vz(fresh, "launch", "minimal", "kept")
    assert r.returncode == 0, r.stderr
    mode = os.stat(fresh.socket).st_mode
    assert stat.S_IMODE(mode) == 0o660 and stat.S_ISSOCK(mode)
    r = vz(fresh, "daemon", "status")
    assert r.returncode == 0 and "running" in r.stdout
    pid = fresh.client().get_instance("kept").pid
    assert pid
    r = vz(fresh, "daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert not fresh.socket.exists()
    assert os.path.exists(f"/proc/{pid}"), "stopping vzd must not stop the VMs"
    # The next command brings the daemon back, re-attached to the VM.
    r = vz(fresh, "exec", "kept", "--", "echo", "still here")
    assert (r.returncode, r.stdout) == (0, "still here\n"), r.stderr
    inst = fresh.client().get_instance("kept")
    assert inst.state is InstanceState.RUNNING and inst.pid == pid


def test_console_log_and_tty_exec(vzd: Daemon) -> None:
    c = vzd.client()
    c.create_instance(InstanceCreate(name="con"))
    try:
        c.exec_capture("con", ["sh", "-c", "echo marker-on-console > /dev/console"])
        assert b"marker-on-console" in c.console_log("con")
        r = vz(vzd, "console", "con", "--show-log")
        assert r.returncode == 0 and "marker-on-console" in r.stdout
        res, out, _ = c.exec_capture("con", ["sh", "-c", "tty; stty size"], tty=True)
        assert res.exit_code == 0
        assert out.replace(b"\r\n", b"\n").startswith(b"/dev/pts/")
    finally:
        c.delete_instance("con", force=True)
