"""QEMU is jailed: its own mount namespace shows it only its own files, and its seccomp
sandbox is on."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration


def _sees(pid: int, path: Path | str) -> bool:
    # /proc/PID/root is the process's own view of the file system.
    return os.path.exists(f"/proc/{pid}/root{path}")


def test_qemu_cannot_see_another_instances_files(client: Client, vzd: Daemon) -> None:
    client.create_volume("jail-a", "16MiB")
    try:
        client.create_instance({"name": "ja", "volumes": [{"volume": "jail-a"}]})
        client.create_instance({"name": "jb"})
        pa, pb = client.get_instance("ja").pid, client.get_instance("jb").pid
        assert pa and pb
        disk = client.get_volume("jail-a").path
        assert _sees(pa, disk), "a VM sees its own disk"
        assert not _sees(pb, disk), "and no other VM does"
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
