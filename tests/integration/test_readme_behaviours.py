"""Behaviours the README promises that no other test covered: admission against what
running instances hold, UDP port forwards, and `vz shell` / `vz console` on a terminal.

(One writer per volume, and snapshots, copies and exports leaving volumes out, are in
test_volumes.py beside the other volume tests.)
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.netns import UPLINK, in_ns
from vzkit.api.instances import InstanceState
from vzkit.guest.build import _compiler
from vzkit.network._netns import entered
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

MiB = 1024**2
RESERVE = 512 * MiB  # OvercommitPolicy.memory_reserve: host RAM never given to instances


# ---------------------------------------------------------------------------- admission


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _refused(r: subprocess.CompletedProcess[bytes], *words: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and "hint: " in err, err
    for word in words:
        assert word in err, err


def test_admission_counts_what_running_instances_hold(private_daemon: Daemon) -> None:
    """README: `--cpus` and `--memory` are checked against the host and what running
    instances already hold."""
    d = private_daemon
    cpus = os.cpu_count() or 1
    # No overcommit: the vCPU budget is the host's CPUs; the memory budget 600 MiB.
    d.env["VZ_CPU_OVERCOMMIT"] = "1"
    d.env["VZ_MEMORY_OVERCOMMIT"] = repr(600 * MiB / (_mem_total() - RESERVE))
    d.start()
    c = d.client()
    c.build_image("minimal")

    def launch(name: str, *limits: str) -> subprocess.CompletedProcess[bytes]:
        return d.vz("launch", "minimal", name, "--type", "container", *limits)

    # Against the host alone.
    _refused(launch("huge", "--cpus", str(cpus + 1)), f"the host has {cpus} CPUs")
    # Against what runs: the first takes every CPU, so a second does not fit...
    r = launch("first", "--cpus", str(cpus), "--memory", "256MiB")
    assert r.returncode == 0, r.stderr
    _refused(launch("second", "--cpus", "1"), f"{cpus} vCPUs already allocated to 1 instance")
    assert [i.name for i in c.list_instances()] == ["first"]
    # ...until it stops: a stopped instance holds nothing.
    assert d.vz("stop", "first").returncode == 0
    r = launch("second", "--cpus", "1", "--memory", "400MiB")
    assert r.returncode == 0, r.stderr
    # Starting again is admitted the same way, and a refused start leaves it stopped.
    if cpus > 1:
        _refused(d.vz("start", "first"), "1 vCPUs already allocated to 1 instance")
        assert c.get_instance("first").state is InstanceState.STOPPED
    # Memory: 400 MiB held, 256 MiB more is over the 600 MiB budget.
    c.delete_instance("first")
    _refused(
        launch("third", "--cpus", "1", "--memory", "256MiB"),
        "400MiB already allocated to 1 instance",
    )
    assert [i.name for i in c.list_instances()] == ["second"]
    c.stop("second")
    r = launch("third", "--cpus", "1", "--memory", "256MiB")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- UDP forwards

# The minimal image's busybox has no UDP server: a tiny static one, built by the test.
UDP_ECHO = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in me = {0};
    me.sin_family = AF_INET;
    me.sin_port = htons(atoi(argv[1]));
    if (s < 0 || bind(s, (struct sockaddr *)&me, sizeof me) < 0) return 1;
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    for (;;) {
        char in[256], out[400];
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(s, in, sizeof in - 1, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) continue;
        in[n] = 0;
        int m = snprintf(out, sizeof out, "%s from %s", in, host);
        sendto(s, out, m, 0, (struct sockaddr *)&peer, len);
    }
}
"""


def _udp_echo_binary(tmp_path: Path) -> Path:
    source, binary = tmp_path / "udp-echo.c", tmp_path / "udp-echo"
    source.write_text(UDP_ECHO)
    subprocess.run([*_compiler(), "-o", str(binary), str(source)], check=True, timeout=120)
    return binary


def _udp_ask(ns: str, host: str, port: int, message: bytes, deadline: float = 30) -> bytes | None:
    """Send ``message`` over UDP from inside ``ns`` until a reply comes; None if none does
    (or the far end says no one listens)."""
    end = time.monotonic() + deadline
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(1)
        sock.connect((host, port))
        while time.monotonic() < end:
            try:
                sock.send(message)
                return sock.recv(512)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                return None
    return None


def test_udp_port_forward(netd: Daemon, tmp_path: Path) -> None:
    """README: `vz port add web 8080:80` forwards host port 8080 to web:80; /udp too. All
    traffic stays inside the test's own namespaces."""
    c = netd.client()
    ns, world = netd.netns, netd.world
    assert ns and world
    c.create_instance({"name": "dns", "type": "container", "image": "minimal"})
    with _udp_echo_binary(tmp_path).open("rb") as f:
        c.push_file("dns", "/udp-echo", f, mode=0o755)
    res, out, err = c.exec_capture("dns", ["sh", "-c", "/udp-echo 53 >/dev/null 2>&1 &"])
    assert res.exit_code == 0, out + err
    r = netd.vz("port", "add", "dns", "8053:53/udp")
    assert r.returncode == 0, r.stderr
    assert b"8053/udp" in r.stdout, r.stdout
    # From the host's loopback, and from outside through the host's uplink address.
    assert _udp_ask(ns, "127.0.0.1", 8053, b"ping") == b"ping from dns"
    assert _udp_ask(world, UPLINK, 8053, b"hello") == b"hello from dns"
    # Only UDP is forwarded: nothing answers TCP on that port.
    with entered(ns):
        tcp = socket.socket()
    with tcp, pytest.raises(ConnectionRefusedError):
        tcp.settimeout(10)
        tcp.connect(("127.0.0.1", 8053))
    # Removed, it forwards nothing (a new flow: a new source port).
    r = netd.vz("port", "remove", "dns", "8053/udp")
    assert r.returncode == 0, r.stderr
    assert "dport 8053" not in in_ns(ns, "nft", "list", "ruleset")
    assert _udp_ask(ns, "127.0.0.1", 8053, b"again", deadline=3) is None


# ---------------------------------------------------------------------------- terminals


class Terminal:
    """A `vz` command on a pseudo-terminal of the test's own; the test holds the master."""

    def __init__(self, d: Daemon, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vzkit.cli.main", "--no-autostart", *args],
                env=d.env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 60) -> None:
        """Read until ``text`` has been shown (or fail, showing what was)."""
        end = time.monotonic() + timeout
        while text not in self.seen:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"{text!r} not shown; the terminal has: {self.seen!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the command closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"{text!r} not shown before the end: {self.seen!r}")
            self.seen += chunk

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    yield made
    for term in made:
        term.close()


def test_shell_attaches_and_exits_with_the_shell(
    vzd: Daemon, client: Client, terminals: list[Terminal]
) -> None:
    """README: `vz shell web` is an interactive shell on a pty; it exits with the shell."""
    client.create_instance({"name": "web", "type": "container"})
    term = Terminal(vzd, "shell", "web", rows=30, cols=100)
    terminals.append(term)
    # Keys typed before the shell is there are dropped (the CLI flushes its terminal when
    # it makes it raw): wait for the prompt.
    term.expect(b"# ")
    # A terminal of its own inside, as big as ours; `echo` proves the keys go through.
    term.type(b"tty; stty size; echo sum=$((6 * 7))\r")
    term.expect(b"sum=42")
    assert b"/dev/pts/" in term.seen and b"30 100" in term.seen
    term.type(b"exit 3\r")
    assert term.wait() == 3
    assert client.get_instance("web").state is InstanceState.RUNNING
    # Without a terminal it refuses, and says what to use instead.
    r = vzd.vz("shell", "web", input=b"")
    assert r.returncode != 0 and b"needs a terminal" in r.stderr and b"vz exec" in r.stderr


def _to_console(c: Client, name: str, line: str) -> None:
    res, out, err = c.exec_capture(name, ["sh", "-c", f"echo {line} >/dev/console"])
    assert res.exit_code == 0, out + err


def test_console_attaches_and_ctrl_bracket_detaches(
    vzd: Daemon, client: Client, terminals: list[Terminal]
) -> None:
    """README: `vz console web` is the serial console; Ctrl-] detaches."""
    client.create_instance({"name": "serial"})
    _to_console(client, "serial", "written-before")
    for attempt in range(2):  # a detach leaves the console usable for the next one
        term = Terminal(vzd, "console", "serial")
        terminals.append(term)
        term.expect(b"Ctrl-] to detach")
        term.expect(b"written-before")  # the console's history
        _to_console(client, "serial", f"written-live-{attempt}")
        term.expect(f"written-live-{attempt}".encode())  # and what the guest writes now
        term.type(b"\x1d")
        term.expect(b"Detached.")
        assert term.wait() == 0
        assert client.get_instance("serial").state is InstanceState.RUNNING
