"""Snapshots, restores, copies and warm starts of real instances (TCG guests, real qcow2).

Data safety is tested by force: QEMU and the daemon are killed while a snapshot is being
taken, and a file system fills up under one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup
from tests.integration.helpers import sh, wait_for
from vzkit.api.instances import InstanceState
from vzkit.engines.qemu.disks import QemuState
from vzkit.errors import (
    DaemonUnavailable,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
    StateError,
    VzError,
)
from vzkit.sdk.client import Client
from vzkit.server.db import Database

pytestmark = pytest.mark.integration

# A counter that also keeps its whole history: one line per tick, appended. The count is
# replaced by a rename, so a reader never finds it empty.
COUNTER = (
    "(i=0; while true; do i=$((i+1)); echo $i >> /tmp/log; echo $i > /tmp/count.new;"
    " mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &"
)


def count(c: Client, name: str) -> int:
    return int(sh(c, name, "cat /tmp/count"))


def _unbroken(log: str) -> int:
    """The last value of a counter history that ran 1, 2, 3, ... without a gap or a reset
    (a reboot or a restarted loop would start again at 1)."""
    # The line being appended may be cut off: only whole lines count.
    values = [int(v) for v in log.split("\n")[:-1]]
    assert values == list(range(1, len(values) + 1)), values
    return len(values)


def _continues(c: Client, name: str, seen_before: int) -> None:
    """``name`` holds the memory of the snapshot: the marker written before it is there, the
    one written after it is not, and the counter went on from its value at the snapshot."""
    assert sh(c, name, "ls /tmp/before; [ ! -e /tmp/after ] && echo no-after") == (
        "/tmp/before\nno-after\n"
    )
    now = _unbroken(sh(c, name, "cat /tmp/log"))
    assert now >= seen_before and count(c, name) >= seen_before
    assert wait_for(lambda: count(c, name) > now, 30), "the counter stopped"


def test_stateful_snapshot_continues_where_it_was(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "tick"})
    sh(client, "tick", COUNTER)
    assert wait_for(lambda: count(client, "tick") >= 5, 30)
    boot_id = sh(client, "tick", "cat /proc/sys/kernel/random/boot_id")
    sh(client, "tick", "touch /tmp/before")
    before = count(client, "tick")
    info = client.create_snapshot("tick", "s1", stateful=True)
    assert info.stateful and info.size > 0 and info.layer is None
    # Work done after the snapshot, which the restore must take back.
    sh(client, "tick", "touch /tmp/after")
    after = count(client, "tick")
    assert wait_for(lambda: count(client, "tick") >= after + 10, 30)
    assert _unbroken(sh(client, "tick", "cat /tmp/log")) >= after + 10

    r = vzd.vz("snapshot", "restore", "tick", "s1")
    assert r.returncode == 0, r.stderr
    # The same boot (no reboot), the snapshot's memory, and the counter going on from there.
    assert sh(client, "tick", "cat /proc/sys/kernel/random/boot_id") == boot_id
    _continues(client, "tick", before)

    # A warm start: a new instance from the same memory, under its own name.
    script = "hostname; ls /tmp/before; [ ! -e /tmp/after ] && echo no-after; cat /tmp/log"
    r = vzd.vz("run", "--from", "tick/s1", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    host, marker, no_after, log = r.stdout.decode().split("\n", 3)
    assert host.startswith("run-") and (marker, no_after) == ("/tmp/before", "no-after")
    assert _unbroken(log) >= before

    r = vzd.vz("snapshot", "list", "tick", "--format", "json")
    assert [s["name"] for s in json.loads(r.stdout)] == ["s1"]
    client.create_snapshot("tick")  # a disk-less micro-VM: nothing but its config
    assert [s.name for s in client.list_snapshots("tick")] == ["s1", "snap0"]
    with pytest.raises(InvalidConfig, match="holds no memory state"):
        client.create_instance({"name": "w2", "source": "tick/snap0"})
    client.delete_snapshot("tick", "s1")
    with pytest.raises(NotFound):
        client.restore_snapshot("tick", "s1")
    r = vzd.vz("snapshot", "create", "tick", "bad/name")
    assert r.returncode == 2 and b"invalid snapshot name" in r.stderr
    assert [i.name for i in client.list_instances()] == ["tick"]


def test_stateful_needs_a_running_vm(client: Client) -> None:
    client.create_instance({"name": "idle", "start": False})
    with pytest.raises(StateError, match="needs a running instance"):
        client.create_snapshot("idle", stateful=True)
    client.create_instance({"name": "ct", "type": "container"})
    with pytest.raises(InvalidConfig, match="no stateful snapshots"):
        client.create_snapshot("ct", stateful=True)
    assert client.list_snapshots("idle") == [] and client.list_snapshots("ct") == []


def test_container_snapshot_restore_and_copy(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "box", "type": "container"})
    sh(client, "box", "echo one > /root/data; rm /bin/ls")
    client.create_snapshot("box", "s1")
    sh(client, "box", "echo two > /root/data; rm /root/data; touch /root/new")
    inst = client.restore_snapshot("box", "s1")
    assert inst.state is InstanceState.RUNNING
    assert sh(
        client, "box", "cat /root/data; [ ! -e /root/new ] && [ ! -e /bin/ls ] && echo ok"
    ) == ("one\nok\n")
    r = vzd.vz("copy", "box", "box2")
    assert r.returncode == 0, r.stderr
    client.start("box2")
    assert sh(client, "box2", "cat /root/data; hostname") == "one\nbox2\n"
    sh(client, "box2", "echo changed > /root/data")
    assert sh(client, "box", "cat /root/data") == "one\n"


def _snapshot_in_thread(c: Client, name: str, out: list[BaseException | None]) -> threading.Thread:
    def run() -> None:
        try:
            c.create_snapshot(name, "doomed", stateful=True)
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def _building(d: Daemon) -> bool:
    return any(d.settings.instances_dir.glob("*/snapshots/.tmp-doomed"))


def test_killing_qemu_mid_snapshot_leaves_no_snapshot(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "victim"})
    pid = client.get_instance("victim").pid
    assert pid
    out: list[BaseException | None] = []
    t = _snapshot_in_thread(vzd.client(), "victim", out)
    assert wait_for(lambda: _building(vzd), 60)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive(), "the snapshot call never returned"
    assert len(out) == 1 and isinstance(out[0], VzError), out
    assert client.list_snapshots("victim") == []
    assert not _building(vzd)
    assert wait_for(lambda: client.get_instance("victim").state is InstanceState.CRASHED, 60)
    client.start("victim")
    assert sh(client, "victim", "echo alive") == "alive\n"


def test_killing_the_daemon_mid_snapshot(private_daemon: Daemon) -> None:
    d = private_daemon
    d.start()
    c = d.client()
    c.create_instance({"name": "vm"})
    out: list[BaseException | None] = []
    t = _snapshot_in_thread(d.client(), "vm", out)
    assert wait_for(lambda: _building(d), 60)
    d.kill(signal.SIGKILL)
    t.join(120)
    # The caller learns that the daemon went away; it is not told the snapshot exists.
    assert not t.is_alive(), "the snapshot call never returned"
    assert len(out) == 1 and isinstance(out[0], DaemonUnavailable), out
    d.start()
    c = d.client()
    assert c.list_snapshots("vm") == []
    assert not _building(d)
    # The new vzd resumed the VM the old one had paused for the snapshot.
    assert c.get_instance("vm").state is InstanceState.RUNNING
    assert sh(c, "vm", "echo alive") == "alive\n"
    c.create_snapshot("vm", "after", stateful=True)
    assert [s.name for s in c.list_snapshots("vm")] == ["after"]


@pytest.fixture
def small_state_dir(private_daemon: Daemon) -> Iterator[Daemon]:
    """A daemon whose state lives on a 40 MiB tmpfs: room for the image, not for a
    micro-VM's memory."""
    state = Path(private_daemon.env["VZ_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "vzt-full", str(state)], check=True)
    try:
        yield private_daemon
    finally:
        # Instances first: a running QEMU keeps files open on the tmpfs.
        _cleanup(private_daemon)
        for _ in range(50):
            if subprocess.run(["umount", str(state)], check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the test tmpfs {state} stayed busy")


def test_a_full_disk_gives_a_clear_error_and_no_partial_files(small_state_dir: Daemon) -> None:
    d = small_state_dir
    d.start()
    c = d.client()
    c.create_instance({"name": "big"})
    with pytest.raises(ResourceExhausted, match="No space left") as err:
        c.create_snapshot("big", "s1", stateful=True)
    assert err.value.hint
    assert c.list_snapshots("big") == []
    leftovers = [p for p in d.settings.instances_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    # The VM was paused for the snapshot and runs on.
    assert c.get_instance("big").state is InstanceState.RUNNING
    assert sh(c, "big", "echo alive") == "alive\n"


# -- VM disks: qcow2 layers ------------------------------------------------------------------


def _top(d: Daemon, name: str) -> Path:
    db = Database(d.settings.db_path)
    try:
        _, uuid, runtime = db.get(name)
    finally:
        db.close()
    return d.settings.instances_dir / uuid / QemuState.model_validate_json(runtime).disk


def _qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True
    )


def _pattern(path: Path, byte: int, offset: int = 0) -> bool:
    """Whether 64 KiB at ``offset`` read as ``byte`` through the whole backing chain."""
    r = _qemu_io(path, f"read -P {byte:#x} {offset} 64k")
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def _write(path: Path, byte: int, offset: int = 0) -> None:
    assert _qemu_io(path, f"write -P {byte:#x} {offset} 64k").returncode == 0


def _backing_chain(top: Path) -> list[Path]:
    """The files under ``top`` in its qcow2 chain, top first."""
    r = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(top)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [Path(layer["filename"]) for layer in json.loads(r.stdout)]


def _shares_frozen_layers(source_top: Path, copy_top: Path) -> bool:
    """Whether the copy is a fresh top over the very files (inodes) of the source's chain
    below its top: nothing was copied."""
    source, copy = _backing_chain(source_top), _backing_chain(copy_top)
    frozen = {p.stat().st_ino for p in source[1:]}
    return (
        len(copy) >= 2
        # Its own files by name (a hard link each), and a top of its own...
        and all(p.parent == copy_top.parent for p in copy)
        and copy[0].stat().st_ino != source[0].stat().st_ino
        # ...over the source's frozen layers themselves.
        and {p.stat().st_ino for p in copy[1:]} <= frozen
    )


@pytest.mark.slow
def test_disk_snapshots_merge_and_copies(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "dsk", "image": "debian", "type": "vm", "start": False})
    _write(_top(vzd, "dsk"), 0xA1)
    client.create_snapshot("dsk", "s1")
    _write(_top(vzd, "dsk"), 0xB2)
    _write(_top(vzd, "dsk"), 0xB2, 1 << 20)
    client.create_snapshot("dsk", "s2")
    _write(_top(vzd, "dsk"), 0xC3)
    layers_before = len(list(_top(vzd, "dsk").parent.glob("*.qcow2")))

    # Deleting s1, which s2 builds on, merges its data into s2's layer: nothing breaks.
    client.delete_snapshot("dsk", "s1")
    assert len(list(_top(vzd, "dsk").parent.glob("*.qcow2"))) == layers_before - 1
    client.restore_snapshot("dsk", "s2")
    assert _pattern(_top(vzd, "dsk"), 0xB2) and _pattern(_top(vzd, "dsk"), 0xB2, 1 << 20)

    # A copy is a new top over the same frozen layers: no data is copied (the layers are
    # the source's own files, hard-linked; benchmarks/snapshots.py times it), and the two
    # are independent after.
    client.copy_instance("dsk", "dsk2")
    assert _shares_frozen_layers(_top(vzd, "dsk"), _top(vzd, "dsk2"))
    assert _pattern(_top(vzd, "dsk2"), 0xB2)
    _write(_top(vzd, "dsk2"), 0xD4)
    assert _pattern(_top(vzd, "dsk"), 0xB2) and _pattern(_top(vzd, "dsk2"), 0xD4)
    # s2's layer is now under a layer the copy shares: deleting s2 is refused, with why.
    with pytest.raises(StateError, match="shared with a copy"):
        client.delete_snapshot("dsk", "s2")
    client.delete_instance("dsk2")
    client.delete_snapshot("dsk", "s2")
    assert _pattern(_top(vzd, "dsk"), 0xB2, 1 << 20)
    for path in _top(vzd, "dsk").parent.glob("*.qcow2"):
        r = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True)
        assert r.returncode == 0, (path, r.stderr)


@pytest.mark.slow
def test_running_vm_disk_and_memory_snapshots(client: Client) -> None:
    client.create_instance(
        {"name": "deb", "image": "debian", "type": "vm", "limits": {"memory": "512MiB"}}
    )
    sh(client, "deb", "echo A > /root/f; sync")
    client.create_snapshot("deb", "s1", stateful=True)
    sh(client, "deb", "echo B > /root/f; sync")
    client.restore_snapshot("deb", "s1")
    # Memory and disk agree: the file as it was, and no reboot in between.
    assert sh(client, "deb", "cat /root/f") == "A\n"
    # A disk snapshot of the running VM switches it to a new layer live.
    client.create_snapshot("deb", "s2")
    sh(client, "deb", "echo C > /root/f; sync")
    client.restore_snapshot("deb", "s2")
    assert sh(client, "deb", "cat /root/f") == "A\n"


# -- export, import, publish -----------------------------------------------------------------


def test_export_import_container_with_snapshots(
    client: Client, vzd: Daemon, tmp_path: Path
) -> None:
    client.create_instance({"name": "src", "type": "container"})
    sh(client, "src", "echo v1 > /root/state")
    client.create_snapshot("src", "s1")
    sh(client, "src", "echo v2 > /root/state; mkdir -p /srv/empty")
    archive = tmp_path / "src.tar"
    r = vzd.vz("export", "src", str(archive))
    assert r.returncode == 1 and b"stop it first" in r.stderr
    assert not archive.exists() and not list(tmp_path.iterdir()), "no partial file"
    client.stop("src", force=True)
    r = vzd.vz("export", "src", str(archive))
    assert r.returncode == 0, r.stderr
    r = vzd.vz("import", str(archive), "--name", "dst")
    assert r.returncode == 0, r.stderr
    client.start("dst")
    assert sh(client, "dst", "cat /root/state; [ -d /srv/empty ] && hostname") == "v2\ndst\n"
    assert [s.name for s in client.list_snapshots("dst")] == ["s1"]
    client.restore_snapshot("dst", "s1")
    assert sh(client, "dst", "cat /root/state") == "v1\n"
    r = vzd.vz("import", str(archive))
    assert r.returncode == 1 and b"already exists" in r.stderr
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all")
    r = vzd.vz("import", str(tmp_path / "junk.tar"), "--name", "junk")
    assert r.returncode == 1 and b"could not be unpacked" in r.stderr
    assert {i.name for i in client.list_instances()} == {"src", "dst"}
    assert not list(vzd.settings.instances_dir.glob(".import-*"))


def test_import_refuses_a_disk_pointing_outside(
    client: Client, vzd: Daemon, tmp_path: Path
) -> None:
    stage = tmp_path / "stage"
    (stage / "instance").mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
         str(stage / "instance" / "root.qcow2")],
        check=True,
    )  # fmt: skip
    rec = {
        "name": "evil", "type": "vm", "image": "minimal", "state": "stopped",
        "limits": {"cpus": 1, "memory": 268435456, "cpu_weight": 100, "cpu_pin": None},
        "created_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    image = {
        "name": "minimal", "digest": "sha256:x", "kind": "initramfs", "kernel_release": "x",
        "size": 1, "created_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    header = {"format": 1, "instance": rec, "runtime": {"top": "root.qcow2"}, "image": image}
    (stage / "vzkit-export.json").write_text(json.dumps(header))
    archive = tmp_path / "evil.tar"
    subprocess.run(["tar", "-C", str(stage), "-cf", str(archive), "."], check=True)
    r = vzd.vz("import", str(archive))
    assert r.returncode == 1 and b"points outside the archive" in r.stderr
    with pytest.raises(NotFound):
        client.get_instance("evil")


@pytest.mark.slow
def test_export_import_and_publish_a_vm(client: Client, vzd: Daemon, tmp_path: Path) -> None:
    client.create_instance({"name": "web", "image": "debian", "type": "vm", "start": False})
    _write(_top(vzd, "web"), 0xE5, 4 << 20)
    client.create_snapshot("web", "s1")
    _write(_top(vzd, "web"), 0xF6, 4 << 20)
    archive = tmp_path / "web.tar"
    with archive.open("wb") as out:
        client.export_instance("web", out)
    with archive.open("rb") as src:
        client.import_instance(src, "web2")
    assert _pattern(_top(vzd, "web2"), 0xF6, 4 << 20)
    client.restore_snapshot("web2", "s1")
    assert _pattern(_top(vzd, "web2"), 0xE5, 4 << 20)
    # The original is untouched by all this.
    assert _pattern(_top(vzd, "web"), 0xF6, 4 << 20)

    r = vzd.vz("publish", "web", "web-image")
    assert r.returncode == 0, r.stderr
    img = client.get_image("web-image")
    assert img.kind == "disk" and "rootfs" in img.files
    assert subprocess.run(["qemu-img", "info", img.files["rootfs"]], capture_output=True,
                          text=True).stdout.count("backing file") == 0  # fmt: skip
    client.create_instance({"name": "fromimg", "image": "web-image", "type": "vm", "start": False})
    assert _pattern(_top(vzd, "fromimg"), 0xF6, 4 << 20)
    r = vzd.vz("publish", "web", "debian")
    assert r.returncode == 1 and b"built-in image" in r.stderr
    client.delete_instance("fromimg")
    client.delete_image("web-image")
