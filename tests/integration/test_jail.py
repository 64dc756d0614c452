"""QEMU is jailed: its own mount namespace shows it only its own files, and its seccomp
sandbox is on."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import sh
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration


def _sees(pid: int, path: Path | str) -> bool:
    # /proc/PID/root is the process's own view of the file system.
    return os.path.lexists(f"/proc/{pid}/root{path}")


def _as_qemu(pid: int, script: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` in QEMU's mount namespace as its user: what QEMU itself could do."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", "setpriv", "--reuid=vz-qemu",
         "--regid=vz-qemu", "--init-groups", "--", "sh", "-c", script],
        capture_output=True,
        timeout=60,
    )  # fmt: skip


def test_qemu_cannot_see_another_instances_files(client: Client, vzd: Daemon) -> None:
    client.create_volume("jail-a", "16MiB")
    try:
        client.create_instance({"name": "ja", "volumes": [{"volume": "jail-a"}]})
        client.create_instance({"name": "jb"})
        pa, pb = client.get_instance("ja").pid, client.get_instance("jb").pid
        assert pa and pb
        disk = client.get_volume("jail-a").path
        # A volume reaches its VM as a descriptor: no VM sees the pool, its own neither.
        assert not _sees(pa, disk) and not _sees(pb, disk)
        with pytest.raises(OSError):
            Path(f"/proc/{pb}/root{disk}").read_bytes()
        # Nor the database, nor other instances' directories, nor vzd's socket.
        assert not _sees(pb, vzd.settings.db_path)
        assert not _sees(pb, vzd.socket)
        on_host = set(os.listdir(vzd.settings.instances_dir))
        seen = set(os.listdir(f"/proc/{pb}/root{vzd.settings.instances_dir}"))
        assert len(seen) == 1 and seen < on_host
        # The kernel and initramfs are there, read-only.
        assert os.listdir(f"/proc/{pb}/root{vzd.settings.images_dir}")
        status = Path(f"/proc/{pb}/status").read_text()
        assert "Seccomp:\t2" in status, "QEMU's seccomp filter is on"
        # An unprivileged user (scripts/setup creates it), with no capabilities.
        uid = pwd.getpwnam("vz-qemu").pw_uid
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
        assert "CapEff:\t0000000000000000" in status
    finally:
        for name in ("ja", "jb"):
            if name in {i.name for i in client.list_instances()}:
                client.delete_instance(name, force=True)
        client.delete_volume("jail-a")


@pytest.fixture
def outside_pool(client: Client, vzd: Daemon) -> Iterator[str]:
    """A pool outside the daemon's state directory (where vz-qemu could read it, were it
    in view), with two volumes."""
    path = vzd.root / "jailpool"
    client.create_pool("jailpool", str(path))
    client.create_volume("own", "16MiB", pool="jailpool")
    client.create_volume("other", "16MiB", pool="jailpool")
    try:
        yield "jailpool"
    finally:
        for name in ("jown", "jother"):
            if name in {i.name for i in client.list_instances()}:
                client.delete_instance(name, force=True)
        for vol in ("own", "other"):
            client.delete_volume(vol, pool="jailpool")
        client.delete_pool("jailpool")
        shutil.rmtree(path, ignore_errors=True)


def test_qemu_sees_no_pool_and_no_other_daemon(
    client: Client, vzd: Daemon, outside_pool: str, private_daemon: Daemon
) -> None:
    second = private_daemon
    second.start()
    assert second.settings.state_dir.is_dir()
    client.create_instance(
        {"name": "jother", "volumes": [{"volume": "other", "pool": outside_pool}]}
    )
    client.create_instance({"name": "jown", "volumes": [{"volume": "own", "pool": outside_pool}]})
    pid = client.get_instance("jown").pid
    assert pid
    own = client.get_volume("own", pool=outside_pool).path
    other = client.get_volume("other", pool=outside_pool).path

    # Its own volume works in the guest: written and read back through the agent.
    dev = "/dev/disk/by-id/virtio-own"
    sh(client, "jown", f"echo own-data | dd of={dev} bs=512 count=1 conv=sync 2>/dev/null")
    assert sh(client, "jown", f"echo 3 > /proc/sys/vm/drop_caches; head -c 8 {dev}") == "own-data"

    # Neither the pool (outside the state dir), nor another daemon's state, nor /proc
    # (where /proc/PID/root of a QEMU running as the same user would lead).
    for path in (other, own, Path(other).parent, second.settings.state_dir, second.root):
        assert not _sees(pid, path), path
    assert not _sees(pid, "/proc/self")
    r = _as_qemu(pid, f"cat {other} || ls {second.settings.state_dir} || ls /proc/1/root")
    assert r.returncode != 0 and not r.stdout, r
    # What the jail holds: the system, read-only, and the instance's own directories.
    r = _as_qemu(pid, "ls / && ! touch /usr/vz-jail-probe 2>/dev/null")
    assert r.returncode == 0, r
    assert set(r.stdout.decode().split()) <= {"bin", "dev", "etc", "lib", "lib32", "lib64",
                                              "libx32", "sbin", "usr", *_tops(vzd)}  # fmt: skip


def _tops(d: Daemon) -> set[str]:
    """The first components of the daemon's directories (the jail holds paths under them)."""
    dirs = (d.settings.images_dir, d.settings.instances_dir, d.settings.instance_runtime_dir)
    return {Path(p).parts[1] for p in dirs}


def test_without_the_jail_volumes_work_as_descriptors(private_daemon: Daemon) -> None:
    d = private_daemon
    d.env["VZ_JAIL"] = "0"
    d.start()
    c = d.client()
    c.create_volume("nojail", "16MiB")
    c.create_instance({"name": "free", "volumes": [{"volume": "nojail"}]})
    pid = c.get_instance("free").pid
    assert pid
    # No jail: QEMU shares vzd's view, and still opens the volume by descriptor.
    assert os.readlink(f"/proc/{pid}/root") == "/"
    dev = "/dev/disk/by-id/virtio-nojail"
    sh(c, "free", f"echo free-data | dd of={dev} bs=512 count=1 conv=sync 2>/dev/null")
    assert sh(c, "free", f"echo 3 > /proc/sys/vm/drop_caches; head -c 9 {dev}") == "free-data"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(c.get_volume("nojail").path).encode() not in cmdline
