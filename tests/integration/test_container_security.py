"""Isolation from the host: user-namespaced containers, a state directory closed to local
users, a pids limit, and paths a container controls that vzd must not follow.

Local users are played by ``setpriv`` as nobody, with no groups.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration import icmp
from tests.integration.helpers import compile_static, sh, wait_for
from vzkit.api.instances import InstanceCreate, InstanceState
from vzkit.errors import NotFound
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def as_nobody(*argv: str) -> tuple[int, bytes, str]:
    """Exit status, stdout and stderr of ``argv`` run as nobody:nogroup, without groups."""
    # Through a shell: setpriv keeps root's capabilities until its own execve, so the
    # program's path would still be looked up with them.
    r = subprocess.run(
        [*NOBODY, "sh", "-c", 'exec "$@"', "sh", *argv], capture_output=True, timeout=30
    )
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def uuid_of(d: Daemon, name: str) -> str:
    """The instance's directory name, found by the file the test put in its upper layer."""
    marks = list(d.settings.instances_dir.glob(f"*/upper/.mark-{name}"))
    assert len(marks) == 1, marks
    return marks[0].parent.parent.name


@pytest.fixture
def container(client: Client) -> Iterator[str]:
    client.create_instance(InstanceCreate.model_validate({"name": "uns", "type": "container"}))
    yield "uns"
    with contextlib.suppress(NotFound):
        client.delete_instance("uns", force=True)


def test_default_container_is_user_namespaced(
    vzd: Daemon, client: Client, container: str, tmp_path: Path
) -> None:
    assert sh(client, container, "id -u").strip() == "0"
    inside, host, size = (int(x) for x in sh(client, container, "cat /proc/self/uid_map").split())
    assert inside == 0 and host > 0 and size >= 65536
    gid_line = sh(client, container, "cat /proc/self/gid_map").split()
    assert int(gid_line[1]) > 0
    # The image's files (host root's on disk) are the container's root's, through the
    # idmapped lower layer: root can change them, and a copy-up keeps that owner.
    assert sh(client, container, "stat -c %u:%g /bin/busybox /etc").split() == ["0:0", "0:0"]
    sh(client, container, "echo changed >> /etc/hostname && touch /.mark-uns")
    uuid = uuid_of(vzd, container)
    upper = vzd.settings.instances_dir / uuid / "upper"
    for path in (upper / "etc" / "hostname", upper / ".mark-uns", upper):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (host, int(gid_line[1])), path

    # A setuid-root program planted by the container: owned by its mapped root on the
    # host, never by host root, and out of a local user's reach anyway.
    prog = compile_static(
        tmp_path,
        "whoami",
        """
        #include <stdio.h>
        #include <unistd.h>
        int main(void) { printf("euid=%d\\n", (int)geteuid()); return 0; }
        """,
    )
    client.push_file(container, "/planted", prog.read_bytes(), mode=0o755)
    sh(client, container, "chown 0:0 /planted && chmod 4755 /planted")
    planted = upper / "planted"
    st = planted.stat()
    assert st.st_mode & 0o4000 and st.st_uid == host != 0
    run_dir = vzd.settings.instance_runtime_dir / uuid
    for path in (planted, run_dir / "rootfs" / "planted"):
        code, out, err = as_nobody(str(path))
        assert code != 0 and b"euid=0" not in out, (path, out, err)
        assert "Permission denied" in err, err
    sdir = vzd.settings.instances_dir / uuid
    assert sdir.stat().st_mode & 0o777 == 0o700
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert vzd.settings.state_dir.stat().st_mode & 0o777 == 0o711
    assert vzd.settings.runtime_dir.stat().st_mode & 0o777 == 0o711
    inst = client.get_instance(container)
    assert not inst.security.privileged and inst.warnings == []


def test_container_files_exec_and_restart_as_mapped_root(
    vzd: Daemon, client: Client, container: str
) -> None:
    client.push_file(container, "/root/pushed", b"data\n", mode=0o600, parents=True)
    assert sh(client, container, "stat -c %u:%a /root/pushed").strip() == "0:600"
    _, chunks = client.pull_file(container, "/etc/passwd")
    assert b"root:" in b"".join(chunks)
    client.stop(container)
    client.start(container)
    assert sh(client, container, "cat /root/pushed") == "data\n"
    # A copy and a snapshot keep the owners (cp -a of mapped ids).
    client.create_snapshot(container, "s1")
    sh(client, container, "rm /root/pushed")
    client.stop(container)
    client.restore_snapshot(container, "s1")
    client.start(container)
    assert sh(client, container, "stat -c %u /root/pushed").strip() == "0"
    client.stop(container)
    client.copy_instance(container, "uns-copy")
    try:
        client.start("uns-copy")
        assert sh(client, "uns-copy", "stat -c %u /root/pushed; id -u").split() == ["0", "0"]
        assert not client.get_instance("uns-copy").security.privileged
    finally:
        client.delete_instance("uns-copy", force=True)


def test_privileged_container_works_and_warns(vzd: Daemon, client: Client) -> None:
    r = vzd.vz("launch", "minimal", "priv", "--type", "container", "--privileged")
    try:
        assert r.returncode == 0, r.stderr
        assert b"warning: privileged container" in r.stderr
        inst = client.get_instance("priv")
        assert inst.security.privileged and inst.warnings
        assert sh(client, "priv", "id -u").strip() == "0"
        assert sh(client, "priv", "cat /proc/self/uid_map").split() == ["0", "0", "4294967295"]
        assert "privileged container" in vzd.log_tail()
    finally:
        with contextlib.suppress(NotFound):
            client.delete_instance("priv", force=True)


def test_state_files_are_closed_to_local_users(vzd: Daemon, client: Client) -> None:
    """A VM's disk and memory state, a volume, the database and an image: unreadable for
    a local user (EACCES), while QEMU's own user still boots and restores the VM."""
    client.create_volume("secret", "16MiB")
    client.create_instance(InstanceCreate(name="sealed"))
    client.create_instance(
        InstanceCreate.model_validate(
            {"name": "disked", "image": "debian", "type": "vm", "start": False}
        )
    )
    try:
        client.create_snapshot("sealed", "warm", stateful=True)
        s = vzd.settings
        disks = list(s.instances_dir.glob("*/root.qcow2"))
        memory = list(s.instances_dir.glob("*/snapshots/warm/memory.state"))
        volume = Path(client.get_volume("secret").path)
        blobs = list((s.images_dir / "blobs").iterdir())
        paths = [*disks, *memory, volume, s.db_path, s.state_dir / "audit.log", *blobs]
        assert disks and memory and blobs
        for path in paths:
            assert path.is_file(), path
            code, _, err = as_nobody("cat", str(path))
            assert code != 0 and "Permission denied" in err, (path, err)
        for path in (*disks, *memory, volume, s.db_path, *blobs):
            assert not path.stat().st_mode & 0o007, path
        # QEMU, as vz-qemu, still reads the image's disk (its group's) and restores from a
        # memory state.
        client.start("disked")
        assert client.exec_capture("disked", ["true"])[0].exit_code == 0
        client.restore_snapshot("sealed", "warm")
        assert client.get_instance("sealed").state is InstanceState.RUNNING
        assert client.exec_capture("sealed", ["true"])[0].exit_code == 0
    finally:
        for name in ("sealed", "disked"):
            client.delete_instance(name, force=True)
        client.delete_volume("secret")


def test_old_installation_is_tightened_on_start(private_daemon: Daemon) -> None:
    """A state directory from before (0755 directories, 0644 files) is closed on start;
    what is inside a container's layers keeps its modes."""
    d = private_daemon
    d.start()
    c = d.client()
    c.create_instance(InstanceCreate.model_validate({"name": "old", "type": "container"}))
    sh(c, "old", "touch /.mark-old && chmod 644 /.mark-old")
    d.stop()
    s = d.settings
    uuid = uuid_of(d, "old")
    for path in (s.state_dir, s.instances_dir, s.instances_dir / uuid, s.images_dir):
        path.chmod(0o755)
    s.db_path.chmod(0o644)
    d.start()
    assert s.state_dir.stat().st_mode & 0o777 == 0o711
    assert s.instances_dir.stat().st_mode & 0o777 == 0o711
    assert (s.instances_dir / uuid).stat().st_mode & 0o777 == 0o700
    assert s.db_path.stat().st_mode & 0o777 == 0o600
    assert not s.images_dir.stat().st_mode & 0o007
    assert (s.instances_dir / uuid / "upper" / ".mark-old").stat().st_mode & 0o777 == 0o644
    assert d.client().get_instance("old").state is InstanceState.RUNNING


def test_fork_bomb_stays_at_its_limit_and_force_stop_empties_it(
    vzd: Daemon, client: Client
) -> None:
    client.create_instance(InstanceCreate.model_validate({"name": "bomb", "type": "container"}))
    try:
        pid = client.get_instance("bomb").pid
        assert pid
        pids_dir = _pids_cgroup(pid)
        assert (pids_dir / "pids.max").read_text().strip() == "2048", "the default limit"
        # A small limit, set live, for a small bomb on a shared machine.
        assert vzd.vz("config", "set", "bomb", "limits.processes=64").returncode == 0
        assert int((pids_dir / "pids.max").read_text()) == 64
        # In the background, its output nowhere: the exec returns, the bomb goes on.
        sh(client, "bomb", "b() { b | b & }; (b) </dev/null >/dev/null 2>&1 &")
        assert wait_for(lambda: _limit_hits(pids_dir) > 0, 60), "the bomb never hit the limit"
        assert int((pids_dir / "pids.current").read_text()) <= 64
        members = (pids_dir / "cgroup.procs").read_text().split()
        r = vzd.vz("stop", "--force", "bomb")
        assert r.returncode == 0, r.stderr
        assert client.get_instance("bomb").state is InstanceState.STOPPED
        assert not pids_dir.exists() or not (pids_dir / "cgroup.procs").read_text().split()
        assert not [p for p in members if Path(f"/proc/{p}").exists() and _in(p, pids_dir)]
        # Live update through vz config set reaches the cgroup on the next start.
        assert vzd.vz("config", "set", "bomb", "limits.processes=100").returncode == 0
        client.start("bomb")
        pid = client.get_instance("bomb").pid
        assert pid and int((_pids_cgroup(pid) / "pids.max").read_text()) == 100
        assert vzd.vz("config", "set", "bomb", "limits.processes=80").returncode == 0
        assert int((_pids_cgroup(pid) / "pids.max").read_text()) == 80
        r = vzd.vz("config", "set", "bomb", "limits.processes=1")
        assert r.returncode != 0 and b"limits.processes" in r.stderr
    finally:
        client.delete_instance("bomb", force=True)


def _pids_cgroup(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
    return Path("/sys/fs/cgroup") / Path(f"/proc/{pid}/cgroup").read_text().split("::")[-1]


def _limit_hits(pids_dir: Path) -> int:
    for line in (pids_dir / "pids.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "max":
            return int(value)
    return 0


def _in(pid: str, pids_dir: Path) -> bool:
    with contextlib.suppress(OSError):
        return str(pids_dir).endswith(
            next(
                ln.split(":", 2)[2]
                for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if "pids" in ln.split(":", 2)[1]
            )
        )
    return False


def test_fresh_volume_is_handed_to_the_container_root(vzd: Daemon, client: Client) -> None:
    client.create_volume("shared", "16MiB", content="filesystem")
    try:
        client.create_instance(
            InstanceCreate.model_validate(
                {
                    "name": "vol",
                    "type": "container",
                    "volumes": [{"volume": "shared", "path": "/data"}],
                }
            )
        )
        sh(client, "vol", "echo hi > /data/f && stat -c %u /data/f | grep -x 0")
        options = sh(client, "vol", "grep ' /data ' /proc/mounts").split()[3].split(",")
        assert "nosuid" in options and "nodev" in options
        host_file = Path(client.get_volume("shared").path) / "f"
        assert host_file.stat().st_uid > 0
        code, _, err = as_nobody("cat", str(host_file))
        assert code != 0 and "Permission denied" in err
    finally:
        with contextlib.suppress(NotFound):
            client.delete_instance("vol", force=True)
        client.delete_volume("shared")


@pytest.fixture(autouse=True)
def _no_stray_userns_helpers() -> Iterator[None]:
    yield
    # The user namespace helper (unshare ... sh) exits as soon as its map is written.
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                assert not cmd.startswith(b"unshare\0--user\0--\0sh"), cmd


def test_no_raw_sockets_but_ping_works(netd: Daemon) -> None:
    """CAP_NET_RAW is gone (raw sockets: EPERM); an ICMP echo to the gateway still works
    through a datagram socket, which net.ipv4.ping_group_range opens to every group of the
    container. Unprivileged (the default) and privileged containers alike."""
    c = netd.client()
    for name, privileged in (("pinger", False), ("ppinger", True)):
        security = {"security": {"privileged": True}} if privileged else {}
        c.create_instance(
            InstanceCreate.model_validate({"name": name, "type": "container", **security})
        )
        gateway = c.get_network("vzbr0").gateway
        c.push_file(name, icmp.PROBE_PATH, icmp.probe(), mode=0o755)
        out = sh(c, name, f"{icmp.PROBE_PATH} check {gateway}").split()
        assert out == ["raw=EPERM", "root=reply", "nobody=reply"], (name, out)
        cap_eff = int(sh(c, name, "grep CapEff /proc/self/status").split()[1], 16)
        assert not cap_eff & (1 << 13), "CAP_NET_RAW must be dropped"


def test_resolv_conf_is_written_inside_the_container(netd: Daemon) -> None:
    """A container whose /etc is a symlink to a path that exists on the host, and whose
    resolv.conf is a symlink climbing out with ../..: vzd writes resolv.conf in the
    container's own tree, and the host's files stay untouched."""
    c = netd.client()
    host_dir = Path(tempfile.mkdtemp(prefix="vzt-resolv-"))
    try:
        (host_dir / "x").write_text("host file\n")
        (host_dir / "resolv.conf").symlink_to("x")
        c.create_instance(InstanceCreate.model_validate({"name": "trap", "type": "container"}))
        t = str(host_dir)
        sh(
            c,
            "trap",
            f"mkdir -p {t} && cp -a /etc/. {t}/ && rm -rf /etc && ln -s {t} /etc && "
            f"rm -f {t}/resolv.conf && ln -s ../../../../{t.lstrip('/')}/x {t}/resolv.conf && "
            f"echo container file > {t}/x",
        )
        c.restart("trap")
        assert (host_dir / "x").read_text() == "host file\n"
        assert os.readlink(host_dir / "resolv.conf") == "x"
        assert sorted(p.name for p in host_dir.iterdir()) == ["resolv.conf", "x"]
        gateway = str(c.get_network("vzbr0").gateway)
        assert f"nameserver {gateway}" in sh(c, "trap", "cat /etc/resolv.conf")
        # The container's own x is its own business: untouched as well.
        assert sh(c, "trap", f"cat {t}/x") == "container file\n"
    finally:
        with contextlib.suppress(NotFound):
            c.delete_instance("trap", force=True)
        shutil.rmtree(host_dir, ignore_errors=True)
