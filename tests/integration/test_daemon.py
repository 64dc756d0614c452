"""The daemon: started by the CLI on demand, socket permissions, clean stop without the VMs."""

from __future__ import annotations

import os
import stat

import pytest

from tests.conftest import Daemon
from vzkit._proc import alive
from vzkit.api.instances import InstanceCreate, InstanceState

pytestmark = pytest.mark.integration


def test_cli_starts_the_daemon_and_stop_keeps_vms(private_daemon: Daemon) -> None:
    d = private_daemon
    r = d.vz("daemon", "status")
    assert r.returncode == 3 and b"not running" in (r.stdout + r.stderr)
    r = d.vz("launch", "minimal", "kept", autostart=True)
    assert r.returncode == 0, r.stderr
    mode = os.stat(d.socket).st_mode
    assert stat.S_IMODE(mode) == 0o660 and stat.S_ISSOCK(mode)
    r = d.vz("daemon", "status")
    assert r.returncode == 0 and b"running" in r.stdout
    pid = d.client().get_instance("kept").pid
    assert pid
    r = d.vz("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert not d.socket.exists()
    assert alive(pid), "stopping vzd must not stop the VMs"
    # The next command brings the daemon back, re-attached to the VM.
    r = d.vz("exec", "kept", "--", "echo", "still here", autostart=True)
    assert (r.returncode, r.stdout) == (0, b"still here\n"), r.stderr
    inst = d.client().get_instance("kept")
    assert inst.state is InstanceState.RUNNING and inst.pid == pid


def test_console_log_and_tty_exec(vzd: Daemon) -> None:
    c = vzd.client()
    c.create_instance(InstanceCreate(name="con"))
    try:
        c.exec_capture("con", ["sh", "-c", "echo marker-on-console > /dev/console"])
        assert b"marker-on-console" in c.console_log("con")
        r = vzd.vz("console", "con", "--show-log")
        assert r.returncode == 0 and b"marker-on-console" in r.stdout
        res, out, _ = c.exec_capture("con", ["sh", "-c", "tty; stty size"], tty=True)
        assert res.exit_code == 0
        assert out.replace(b"\r\n", b"\n").startswith(b"/dev/pts/")
    finally:
        c.delete_instance("con", force=True)
