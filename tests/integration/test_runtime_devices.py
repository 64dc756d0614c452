"""The device controller (issue 11, "containers can create and open host devices"): a
container with CAP_MKNOD can neither make nor open a host device it was not given, and the
default ones (null, zero, full, random, urandom, tty, ptmx, pts) still work.

On this host (cgroup v1) the rules go to the devices controller; the cgroup v2 program is
exercised here on the hybrid host's cgroup2 tree (the kernel runs a device program of any
cgroup2 directory a process is in, next to the v1 controller), and in a real v2-only
guest by test_runtime_cgroup2_vm.py.
"""

# ruff: noqa: F811  (rt: a fixture imported from test_runtime_resources, used by name)

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_runtime_resources import (  # noqa: F401 - a fixture used by name
    CG,
    Runtime,
    rt,
)

pytestmark = pytest.mark.integration

KVM = ("c", 10, 232)  # /dev/kvm
LOOP0 = ("b", 7, 0)  # /dev/loop0


def _node(path: str, kind: str, major: int, minor: int) -> dict[str, Any]:
    return {"path": path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666}


def _with_nodes(*nodes: dict[str, Any]) -> Any:
    """Ask the runtime to create these nodes (linux.devices: mknod of them is allowed,
    nothing more), and bind the host's /dev/kvm in: a node made by someone else."""

    def edit(config: dict[str, Any]) -> None:
        config["linux"]["devices"] = list(nodes)
        if Path("/dev/kvm").exists():
            config["mounts"].append(
                {"destination": "/dev/kvm", "type": "bind", "source": "/dev/kvm",
                 "options": ["bind"]}
            )  # fmt: skip
        assert "CAP_MKNOD" in config["process"]["capabilities"]["bounding"]

    return edit


# Each line: NAME=OK, or NAME= followed by the error busybox printed.
PROBE = """
try() { if out=$(sh -c "$2" 2>&1); then echo "$1=OK"; else echo "$1=$out"; fi; }
try mknod-kvm 'mknod /tmp/kvm c 10 232'
try mknod-loop 'mknod /tmp/loop b 7 1'
try open-kvm ': < /dev/kvm'
try open-loop ': < /dev/loop0'
try null 'echo x > /dev/null && : < /dev/null'
try zero 'head -c 4 /dev/zero | wc -c | grep -q 4'
try full ': < /dev/full'
try random 'head -c 4 /dev/random | wc -c | grep -q 4'
try urandom 'head -c 4 /dev/urandom | wc -c | grep -q 4'
try tty ': < /dev/tty'
try ptmx ': < /dev/ptmx'
"""


def _probe(rt: Runtime, edit: Any, resources: dict[str, Any] | None = None) -> dict[str, str]:
    cid = rt.new_id()
    b = rt.bundle(cid, ["sh", "-c", PROBE], resources, edit)
    proc = rt("run", "--bundle", str(b), cid, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_host_devices_cannot_be_made_or_opened(rt: Runtime) -> None:
    """The regression test: before, mknod of /dev/kvm and a loop device, and then open,
    succeeded in a container with CAP_MKNOD."""
    got = _probe(rt, _with_nodes(_node("/dev/loop0", *LOOP0)))
    for name in ("mknod-kvm", "mknod-loop", "open-loop"):
        assert "Operation not permitted" in got[name], (name, got)
    if Path("/dev/kvm").exists():
        assert "Operation not permitted" in got["open-kvm"], got
    for name in ("null", "zero", "full", "random", "urandom", "ptmx"):
        assert got[name] == "OK", (name, got)
    # No controlling terminal (ENXIO), but not refused by the device rules (EPERM).
    assert "Operation not permitted" not in got["tty"], got


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs a host /dev/kvm to open")
def test_an_allowed_device_opens(rt: Runtime) -> None:
    allow = {"devices": [{"allow": True, "type": "c", "major": 10, "minor": 232, "access": "rw"}]}
    got = _probe(rt, _with_nodes(_node("/dev/loop0", *LOOP0)), allow)
    assert got["open-kvm"] == "OK", got
    # Allowed to read and write, not to make: "m" was not granted.
    assert "Operation not permitted" in got["mknod-kvm"], got
    assert "Operation not permitted" in got["open-loop"], got


def test_config_rules_come_before_the_default_list(rt: Runtime) -> None:
    """A config cannot take /dev/null away (the defaults are appended, as runc does), and
    allow-all (a privileged container) really allows all."""
    deny_null = {
        "devices": [{"allow": False, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]
    }
    assert _probe(rt, _with_nodes(), deny_null)["null"] == "OK"
    allow_all = {"devices": [{"allow": True, "access": "rwm"}]}
    got = _probe(rt, _with_nodes(_node("/dev/loop0", *LOOP0)), allow_all)
    assert got["mknod-loop"] == "OK", got


def test_bad_device_rules_fail_clearly(rt: Runtime, tmp_path: Path) -> None:
    cid = rt.new_id()
    bad = {"devices": [{"allow": True, "type": "x", "access": "rwm"}]}
    proc = rt("run", "--bundle", str(rt.bundle(cid, ["true"], bad)), cid, check=False)
    assert proc.returncode == 1
    assert "error: linux.resources.devices[0]: invalid device type 'x'" in proc.stderr
    assert "hint:" in proc.stderr
    assert not list(CG.glob(f"*/{rt.cgroup(cid)}")), "nothing half-made survives"


# ---------------------------------------------------------------------------- cgroup v2


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


@pytest.fixture
def cgroup2_dir() -> Iterator[Path]:
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount")
    d = root / f"vz-rtest-bpf-{os.getpid()}"
    d.mkdir()
    try:
        yield d
    finally:
        d.rmdir()


def _probe_in(cgroup: Path, tmp: Path) -> dict[str, int]:
    """In a child moved into ``cgroup``: the errno of each probe (0: it worked)."""
    probes: dict[str, Callable[[], None]] = {
        "mknod-null": lambda: os.mknod(tmp / "null", 0o20600, os.makedev(1, 3)),
        "open-null": lambda: os.close(os.open("/dev/null", os.O_RDWR)),
        "mknod-kvm": lambda: os.mknod(tmp / "kvm", 0o20600, os.makedev(*KVM[1:])),
        "open-kvm": lambda: os.close(os.open("/dev/kvm", os.O_RDWR)),
    }
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            (cgroup / "cgroup.procs").write_text("0")
            out = {}
            for name, probe in probes.items():
                try:
                    probe()
                    out[name] = 0
                except OSError as exc:
                    out[name] = exc.errno or -1
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result: dict[str, int] = json.loads(data)
    return result


def _attach(cgroup: Path, resources: dict[str, Any]) -> None:
    from vzkit_runtime import devices

    default, exceptions = devices.effective(devices.rules({"linux": {"resources": resources}}))
    devices.attach(str(cgroup), devices.program(default, exceptions))


def test_v2_device_program_denies_unlisted_devices(cgroup2_dir: Path, tmp_path: Path) -> None:
    """The BPF program on a real kernel: the default list lets /dev/null through and
    stops mknod and open of /dev/kvm."""
    _attach(cgroup2_dir, {})
    got = _probe_in(cgroup2_dir, tmp_path)
    assert got["mknod-null"] == got["open-null"] == 0, got
    assert got["mknod-kvm"] == errno.EPERM, got
    if Path("/dev/kvm").exists():
        assert got["open-kvm"] == errno.EPERM, got


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs a host /dev/kvm to open")
def test_v2_device_program_allows_what_is_listed(cgroup2_dir: Path, tmp_path: Path) -> None:
    _attach(cgroup2_dir, {"devices": [{"allow": True, "type": "c", "major": 10, "access": "rw"}]})
    got = _probe_in(cgroup2_dir, tmp_path)
    assert got["open-kvm"] == 0, got
    assert got["mknod-kvm"] == errno.EPERM, got  # rw, not m
