"""Storage pools and volumes through the daemon: real qcow2 disks hot-plugged into running
q35 VMs, bind mounts into running containers, and the refusals that keep data safe."""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import sh
from vzkit.errors import Conflict, InvalidConfig, NotFound, StateError, VzError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration


@pytest.fixture
def volumes(client: Client) -> Iterator[list[str]]:
    """Names of volumes the test makes; deleted (detached first) at the end."""
    made: list[str] = []
    yield made
    for inst in client.list_instances():
        for att in inst.volumes:
            if att.volume in made:
                client.delete_instance(inst.name, force=True)
                break
    for name in made:
        with contextlib.suppress(NotFound):
            client.delete_volume(name)


@pytest.fixture
def pools(client: Client) -> Iterator[list[str]]:
    """Names of pools the test makes; their volumes and then they are deleted at the end,
    whether the test passed or not."""
    made: list[str] = []
    yield made
    for pool in made:
        with contextlib.suppress(NotFound):
            for vol in client.list_volumes(pool):
                client.delete_volume(vol.name, pool=pool)
            client.delete_pool(pool)
    assert not any(p.name in made for p in client.list_pools()), "a test pool stayed"


def test_pools_and_volume_records(
    client: Client, vzd: Daemon, tmp_path: Path, pools: list[str]
) -> None:
    assert [p.name for p in client.list_pools()] == ["default"]
    pools.append("fast")
    r = vzd.vz("storage", "create", "fast", "--path", str(tmp_path / "fast"))
    assert r.returncode == 0, r.stderr
    pool = client.get_pool("fast")
    assert pool.path == tmp_path / "fast" and pool.total > 0 and pool.free > 0
    vol = client.create_volume("scratch", "32MiB", pool="fast")
    assert Path(vol.path).is_file() and vol.size == 32 * 2**20 and vol.attached_to == []
    with pytest.raises(Conflict):
        client.create_volume("scratch", "32MiB", pool="fast")
    with pytest.raises(VzError, match="size"):
        client.create_volume("tiny", 1000, pool="fast")
    with pytest.raises(Conflict, match="still has volumes"):
        client.delete_pool("fast")
    r = vzd.vz("volume", "resize", "scratch", "16MiB", "--pool", "fast")
    assert r.returncode == 1 and b"only grow" in r.stderr
    r = vzd.vz("volume", "resize", "scratch", "64MiB", "--pool", "fast", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == 64 * 2**20
    r = vzd.vz("volume", "list", "--pool", "fast")
    assert r.stdout.decode().splitlines()[1].split()[:4] == ["scratch", "fast", "block", "64MiB"]
    client.delete_volume("scratch", pool="fast")
    assert not Path(vol.path).exists()
    client.delete_pool("fast")
    with pytest.raises(NotFound):
        client.get_pool("fast")
    with pytest.raises(InvalidConfig):
        client.delete_pool("default")


def test_container_volumes_live_and_at_start(client: Client, volumes: list[str]) -> None:
    client.create_volume("shared", "16MiB", content="filesystem")
    volumes.append("shared")
    client.create_instance({"name": "ct", "type": "container"})
    client.attach_volume("ct", "shared", path="/data")
    sh(client, "ct", "echo kept > /data/file")
    client.detach_volume("ct", "shared")
    assert "/data" not in sh(client, "ct", "cat /proc/mounts")
    # Attached to a stopped container: mounted at its next start; read-only this time.
    client.stop("ct", force=True)
    client.attach_volume("ct", "shared", path="/mnt/ro", readonly=True)
    client.start("ct")
    assert sh(client, "ct", "cat /mnt/ro/file") == "kept\n"
    res, _, _ = client.exec_capture("ct", ["sh", "-c", "echo x > /mnt/ro/other"])
    assert res.exit_code != 0
    # Refusals: a block volume, no mount path, another writer.
    client.create_volume("disk1", "16MiB")
    volumes.append("disk1")
    with pytest.raises(InvalidConfig, match="block device"):
        client.attach_volume("ct", "disk1", path="/d")
    client.create_instance({"name": "ct2", "type": "container"})
    with pytest.raises(InvalidConfig, match="mount path"):
        client.attach_volume("ct2", "shared")
    # A writer beside a reader: refused, live or at creation, and nothing changes.
    with pytest.raises(Conflict, match="attached to 'ct'") as err:
        client.attach_volume("ct2", "shared", path="/also")
    assert "read-only" in str(err.value.hint)
    with pytest.raises(Conflict, match="attached to 'ct'"):
        client.create_instance(
            {"name": "ct3", "type": "container", "volumes": [{"volume": "shared", "path": "/w"}]}
        )
    assert [i.name for i in client.list_instances()] == ["ct", "ct2"]
    assert client.get_instance("ct2").volumes == []
    client.attach_volume("ct2", "shared", path="/also", readonly=True)  # readers may share
    assert sh(client, "ct2", "cat /also/file") == "kept\n"
    with pytest.raises(Conflict, match="attached to"):
        client.delete_volume("shared")
    assert sorted(client.get_volume("shared").attached_to) == ["ct", "ct2"]


def test_one_writer_per_volume(client: Client, volumes: list[str]) -> None:
    """README: a volume is attached to one instance at a time unless every attachment is
    read-only."""
    client.create_volume("solo", "16MiB", content="filesystem")
    volumes.append("solo")
    for name in ("w1", "w2"):
        client.create_instance({"name": name, "type": "container"})
    client.attach_volume("w1", "solo", path="/data")
    sh(client, "w1", "echo from-w1 > /data/f")
    # Beside a writer, neither a second writer nor a reader.
    for readonly in (False, True):
        with pytest.raises(Conflict, match="attached to 'w1'"):
            client.attach_volume("w2", "solo", path="/data", readonly=readonly)
    # A stopped writer still holds it: the attachment counts, not the process.
    client.stop("w1", force=True)
    with pytest.raises(Conflict, match="attached to 'w1'"):
        client.attach_volume("w2", "solo", path="/data")
    assert client.get_instance("w2").volumes == []
    assert client.get_volume("solo").attached_to == ["w1"]
    assert " /data " not in sh(client, "w2", "cat /proc/mounts")
    # Once the writer lets go, the next one may write.
    client.detach_volume("w1", "solo")
    client.attach_volume("w2", "solo", path="/data")
    out = sh(client, "w2", "cat /data/f; echo from-w2 > /data/f; cat /data/f")
    assert out == "from-w1\nfrom-w2\n"
    assert client.get_volume("solo").attached_to == ["w2"]


def test_vm_volume_hotplug_resize_and_move(client: Client, volumes: list[str]) -> None:
    client.create_volume("data", "32MiB")
    volumes.append("data")
    client.create_instance({"name": "q35", "type": "vm"})
    client.attach_volume("q35", "data")
    dev = "/dev/disk/by-id/virtio-data"
    sh(client, "q35", f"echo hello-disk | dd of={dev} bs=512 count=1 conv=sync 2>/dev/null; sync")
    # A second live attachment: here the guest sees only the first hot-plugged disk (README),
    # so it fails, says to restart, and leaves nothing half-attached.
    client.create_volume("extra", "16MiB")
    volumes.append("extra")
    with pytest.raises(VzError) as err:
        client.attach_volume("q35", "extra")
    assert err.value.hint and "stop" in err.value.hint, err.value
    assert [v.volume for v in client.get_instance("q35").volumes] == ["data"]
    assert client.get_volume("extra").attached_to == []
    assert sh(client, "q35", "ls /dev/disk/by-id/").split() == ["virtio-data"]
    client.resize_volume("data", "64MiB")
    sectors = sh(client, "q35", f"cat /sys/block/$(basename $(readlink {dev}))/size")
    assert int(sectors) == 64 * 2**20 // 512
    client.detach_volume("q35", "data")
    assert sh(client, "q35", f"[ -e /sys/block/$(basename $(readlink {dev}))/serial ] || echo gone")
    # What the hint says works: attached while stopped, the guest has it after the start.
    client.stop("q35", force=True)
    client.attach_volume("q35", "extra")
    client.start("q35")
    assert sh(client, "q35", "ls /dev/disk/by-id/").split() == ["virtio-extra"]
    client.stop("q35", force=True)
    client.detach_volume("q35", "extra")

    # The same disk at a micro-VM's boot: the data went with it.
    client.create_instance({"name": "mv", "volumes": [{"volume": "data"}]})
    assert sh(client, "mv", f"head -c 10 {dev}") == "hello-disk"
    # A running micro-VM cannot take or drop a disk live: virtio-mmio has no hot-plug.
    with pytest.raises(StateError, match="hot-plug") as err:
        client.detach_volume("mv", "data")
    assert "stop it first" in str(err.value.hint)
    with pytest.raises(InvalidConfig, match="volumes"):
        client.create_snapshot("mv", stateful=True)
    client.create_volume("files", "16MiB", content="filesystem")
    volumes.append("files")
    with pytest.raises(InvalidConfig, match="filesystem volume"):
        client.attach_volume("q35", "files")


def _holding(files: dict[str, bytes], token: str) -> list[str]:
    return [name for name, data in files.items() if token.encode() in data]


def test_snapshots_copies_and_exports_leave_volumes_out(
    client: Client, vzd: Daemon, volumes: list[str], tmp_path: Path
) -> None:
    """README: snapshots, copies and exports cover an instance's own files, not its
    volumes."""
    client.create_volume("keep", "16MiB", content="filesystem")
    volumes.append("keep")
    client.create_instance(
        {"name": "holder", "type": "container", "volumes": [{"volume": "keep", "path": "/data"}]}
    )
    # Own files and volume, at the snapshot and after it.
    own1, vol1, own2, vol2 = (secrets.token_hex(8) for _ in range(4))
    sh(client, "holder", f"echo {own1} > /root/own; echo {vol1} > /data/shared")
    client.create_snapshot("holder", "s1")
    sh(client, "holder", f"echo {own2} > /root/own; echo {vol2} > /data/shared")
    # The snapshot holds the instance's files, and nothing of the volume...
    snap = next(vzd.settings.instances_dir.glob("*/snapshots/s1"))
    files = {str(p): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    assert _holding(files, own1) and _holding(files, vol1) == []
    # ...so restoring it takes the instance's own files back, not the volume's.
    client.restore_snapshot("holder", "s1")
    assert sh(client, "holder", "cat /root/own /data/shared") == f"{own1}\n{vol2}\n"
    assert [v.volume for v in client.get_instance("holder").volumes] == ["keep"]

    # A copy and an export carry the instance's files and no volume (nor its data).
    client.stop("holder", force=True)
    client.copy_instance("holder", "twin")
    archive = tmp_path / "holder.tar"
    r = vzd.vz("export", "holder", str(archive))
    assert r.returncode == 0, r.stderr
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        files = {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in members}
    assert _holding(files, own1) and _holding(files, vol1) == _holding(files, vol2) == []
    r = vzd.vz("import", str(archive), "--name", "back")
    assert r.returncode == 0, r.stderr
    for name in ("twin", "back"):
        assert client.get_instance(name).volumes == []
        client.start(name)
        assert sh(client, name, "cat /root/own; [ -e /data/shared ] || echo no-volume") == (
            f"{own1}\nno-volume\n"
        )
    assert client.get_volume("keep").attached_to == ["holder"]
