"""`vz import` of hostile archives: each is a real export rewritten with Python's tarfile,
as an attacker would, and each must be refused with nothing left behind and nothing of the
host touched; a real container with links, whiteouts, xattrs and setuid files in its upper
layer must still survive the round trip unchanged (issue 11, "vz import trusts what the
archive says")."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import sh
from vzkit.errors import VzError
from vzkit.server.db import Database

pytestmark = pytest.mark.integration

Member = tuple[tarfile.TarInfo, bytes | None]
Edit = Callable[[list[Member], "Host"], list[Member]]


@dataclass(frozen=True)
class Host:
    """Host files an archive aims at: each must stay exactly as it is."""

    secret: Path  # a root-owned file, 0644
    folder: Path  # an empty directory

    def intact(self) -> None:
        st = self.secret.lstat()
        assert self.secret.read_bytes() == b"host secret\n", "the host file was written"
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
        assert list(self.folder.iterdir()) == [], "something was written into a host dir"


@dataclass(frozen=True)
class Exports:
    container: Path
    vm: Path
    upper: dict[str, tuple[object, ...]]  # the exported container's upper layer, summed up


def state_dir(d: Daemon, name: str) -> Path:
    db = Database(d.settings.db_path)
    try:
        return d.settings.instances_dir / db.get(name).uuid
    finally:
        db.close()


def summary(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` as (type and mode, owner, device, link target, content
    hash, xattrs), seen from the host without following a link."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            digest = (
                hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            )
            attrs = {}
            if not stat.S_ISLNK(st.st_mode):
                attrs = {a: os.getxattr(p, a, follow_symlinks=False) for a in os.listxattr(p)}
            out[str(p.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_rdev, target, digest, sorted(attrs.items())
            )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exports(vzd: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exports]:
    """Real exports: a container whose upper layer has every kind of file a container may
    own, with a snapshot; and a micro-VM of the minimal image."""
    out = tmp_path_factory.mktemp("exports")
    c = vzd.client()
    try:
        c.create_instance({"name": "hsrc", "type": "container"})
        sh(c, "hsrc", "echo v1 > /root/state")
        c.create_snapshot("hsrc", "s1")
        sh(
            c,
            "hsrc",
            "echo v2 > /root/state; ln /root/state /root/hard; ln -s ../etc/hostname /root/rel;"
            "ln -s /proc/1/root/etc/shadow /root/escape; cp /bin/busybox /root/suid;"
            "chmod 4755 /root/suid; mkfifo /root/fifo; rm -f /etc/hostname;"
            "rm -rf /etc/init.d 2>/dev/null; mkdir -p /etc/init.d; echo x > /etc/init.d/new",
        )
        c.stop("hsrc", force=True)
        upper = state_dir(vzd, "hsrc") / "upper"
        os.setxattr(upper / "root" / "state", "user.vzkit-test", b"kept")
        container = out / "container.tar"
        with container.open("wb") as f:
            c.export_instance("hsrc", f)
        summed = summary(upper)
        c.create_instance({"name": "hvm", "type": "microvm", "start": False})
        vm = out / "vm.tar"
        with vm.open("wb") as f:
            c.export_instance("hvm", f)
        yield Exports(container, vm, summed)
    finally:
        for name in ("hsrc", "hvm"):
            with contextlib.suppress(VzError):
                c.delete_instance(name, force=True)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n")
    secret.chmod(0o644)
    folder = tmp_path / "folder"
    folder.mkdir()
    return Host(secret, folder)


def read_members(archive: Path) -> list[Member]:
    out: list[Member] = []
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            data = None
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                data = f.read()
                m.type, m.sparse = tarfile.REGTYPE, None  # written back whole
            out.append((m, data))
    return out


def write_members(members: list[Member], dest: Path) -> Path:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            m.size = len(data) if data is not None else 0
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


def entry(
    name: str,
    kind: bytes,
    *,
    mode: int = 0o644,
    link: str = "",
    dev: tuple[int, int] = (0, 0),
    data: bytes | None = None,
) -> Member:
    m = tarfile.TarInfo(name)
    m.type, m.mode, m.linkname = kind, mode, link
    m.devmajor, m.devminor = dev
    return m, data if data is not None else (b"" if kind == tarfile.REGTYPE else None)


def header_of(members: list[Member]) -> dict[str, object]:
    data = dict(members)[next(m for m, _ in members if m.name == "vzkit-export.json")]
    assert data is not None
    header: dict[str, object] = json.loads(data)
    return header


def with_header(members: list[Member], header: dict[str, object]) -> list[Member]:
    return [
        (m, json.dumps(header).encode()) if m.name == "vzkit-export.json" else (m, d)
        for m, d in members
    ]


def replace(members: list[Member], name: str, new: Member) -> list[Member]:
    """``name`` (and, for a directory, everything below it) swapped for ``new``."""
    kept = [(m, d) for m, d in members if m.name != name and not m.name.startswith(name + "/")]
    return [*kept, new]


def assert_refused(d: Daemon, archive: Path, *needles: str, name: str = "evil") -> str:
    """The import fails with a clear error and leaves nothing: no instance, no files."""
    before = set(os.listdir(d.settings.instances_dir))
    r = d.vz("import", str(archive), "--name", name)
    err = r.stderr.decode()
    assert r.returncode == 1 and "error:" in err, err
    assert "internal" not in err, err  # a 4xx naming the problem, never a 500
    for needle in needles:
        assert needle in err, err
    assert name not in {i.name for i in d.client().list_instances()}
    assert set(os.listdir(d.settings.instances_dir)) == before, "files left behind"
    return err


# -- outside a container's own files: plain files and directories only ------------------

CASES: dict[str, Edit] = {
    "console.log is a link to a host file": lambda ms, h: [
        *ms, entry("instance/console.log", tarfile.SYMTYPE, link=str(h.secret))
    ],
    "bundle is a link to a host dir": lambda ms, h: [
        *ms, entry("instance/bundle", tarfile.SYMTYPE, link=str(h.folder))
    ],
    "upper is a link to a host dir": lambda ms, h: replace(
        ms, "instance/upper", entry("instance/upper", tarfile.SYMTYPE, link=str(h.folder))
    ),
    "the header is a link to a host file": lambda ms, h: replace(
        ms, "vzkit-export.json", entry("vzkit-export.json", tarfile.SYMTYPE, link=str(h.secret))
    ),
    "a snapshot's meta.json is a link": lambda ms, h: replace(
        ms,
        "instance/snapshots/s1/meta.json",
        entry("instance/snapshots/s1/meta.json", tarfile.SYMTYPE, link=str(h.secret)),
    ),
    "a hard link outside upper": lambda ms, h: [
        *ms, entry("instance/snapshots/s1/again", tarfile.LNKTYPE, link="vzkit-export.json")
    ],
    "a block device": lambda ms, h: [
        *ms, entry("instance/snapshots/s1/disk", tarfile.BLKTYPE, mode=0o666, dev=(7, 0))
    ],
    "a setuid file outside upper": lambda ms, h: [
        *ms, entry("instance/snapshots/s1/tool", tarfile.REGTYPE, mode=0o4755, data=b"#!")
    ],
    "a world-writable file": lambda ms, h: [
        *ms, entry("instance/snapshots/s1/notes", tarfile.REGTYPE, mode=0o666, data=b"x")
    ],
    "a device in upper": lambda ms, h: [
        *ms, entry("instance/upper/kvm", tarfile.CHRTYPE, mode=0o666, dev=(10, 232))
    ],
    "a member through a link in upper": lambda ms, h: [
        *ms,
        entry("instance/upper/out", tarfile.SYMTYPE, link=str(h.folder)),
        entry("instance/upper/out/planted", tarfile.REGTYPE, data=b"planted"),
    ],
    "a hard link from upper to outside": lambda ms, h: [
        *ms, entry("instance/upper/h", tarfile.LNKTYPE, link="vzkit-export.json")
    ],
    "a name leaving the archive": lambda ms, h: [
        *ms, entry("instance/../../escaped", tarfile.REGTYPE, data=b"x")
    ],
    "an unexpected file in the instance dir": lambda ms, h: [
        *ms, entry("instance/console.log", tarfile.REGTYPE, data=b"x")
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_import_refuses_what_could_reach_the_host(
    case: str, exports: Exports, vzd: Daemon, host: Host, tmp_path: Path
) -> None:
    archive = write_members(CASES[case](read_members(exports.container), host), tmp_path / "x.tar")
    assert_refused(vzd, archive)
    host.intact()


def test_import_keeps_a_containers_own_files(exports: Exports, vzd: Daemon) -> None:
    """Links, whiteouts, FIFOs, hard links, xattrs and setuid files of the upper layer (and
    a link to /proc/1/root that once made export fail) survive export and import as they
    were, and the imported container runs with them."""
    c = vzd.client()
    r = vzd.vz("import", str(exports.container), "--name", "hdst")
    assert r.returncode == 0, r.stderr
    try:
        upper = state_dir(vzd, "hdst") / "upper"
        assert summary(upper) == exports.upper
        st = (upper / "root" / "hard").lstat()
        assert st.st_nlink == 2 and st.st_ino == (upper / "root" / "state").lstat().st_ino
        assert stat.S_ISCHR((upper / "etc" / "hostname").lstat().st_mode)  # the whiteout
        c.start("hdst")
        out = sh(c, "hdst", "cat /root/state; ls /etc/init.d; [ -e /etc/hostname ] || echo gone;"
                            "stat -c %a /root/suid; readlink /root/escape")  # fmt: skip
        assert out == "v2\nnew\ngone\n4755\n/proc/1/root/etc/shadow\n"
        c.restore_snapshot("hdst", "s1")
        assert sh(c, "hdst", "cat /root/state") == "v1\n"
    finally:
        c.delete_instance("hdst", force=True)


# -- disks ---------------------------------------------------------------------------------


def _vm_archive(exports: Exports, tmp_path: Path, disks: list[Member], top: str) -> Path:
    """The real micro-VM export with ``disks`` added and its header naming ``top``."""
    members = read_members(exports.vm)
    header = header_of(members)
    header["runtime"] = {"top": top}
    return write_members([*with_header(members, header), *disks], tmp_path / "vm.tar")


def _qcow2(path: Path, *opts: str) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "1M"],
                   check=True)  # fmt: skip
    return path.read_bytes()


def test_import_refuses_disks_that_reach_outside_the_archive(
    exports: Exports, vzd: Daemon, host: Host, tmp_path: Path
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    # An external data file: QEMU (and publish) would read the host file as the disk.
    data_file = tmp_path / "hostdata"
    top = _qcow2(made / "a.qcow2", "-o", f"data_file={data_file}")
    data_file.write_bytes(b"host data\n" * 100)
    archive = _vm_archive(exports, tmp_path, [entry("instance/root.qcow2", tarfile.REGTYPE,
                                                    data=top)], "root.qcow2")  # fmt: skip
    assert_refused(vzd, archive, "external file")
    # A backing file that is a link to a host file.
    top = _qcow2(made / "b.qcow2", "-b", "base.qcow2", "-F", "qcow2", "-u")
    archive = _vm_archive(
        exports,
        tmp_path,
        [entry("instance/base.qcow2", tarfile.SYMTYPE, link=str(host.secret)),
         entry("instance/root.qcow2", tarfile.REGTYPE, data=top)],
        "root.qcow2",
    )  # fmt: skip
    assert_refused(vzd, archive, "base.qcow2")
    # A backing file of the archive that is not a qcow2 (QEMU would probe its format).
    archive = _vm_archive(
        exports,
        tmp_path,
        [entry("instance/base.qcow2", tarfile.REGTYPE, data=b"\0" * 4096),
         entry("instance/root.qcow2", tarfile.REGTYPE, data=top)],
        "root.qcow2",
    )  # fmt: skip
    assert_refused(vzd, archive, "base.qcow2")
    # A backing name QEMU reads as a protocol, not a file.
    top = _qcow2(made / "c.qcow2", "-b", "nbd:127.0.0.1:1", "-F", "raw", "-u")
    archive = _vm_archive(exports, tmp_path, [entry("instance/root.qcow2", tarfile.REGTYPE,
                                                    data=top)], "root.qcow2")  # fmt: skip
    assert_refused(vzd, archive, "points outside the archive")
    # A snapshot whose record names a layer the archive does not hold.
    members = read_members(exports.container)
    meta = next(d for m, d in members if m.name == "instance/snapshots/s1/meta.json")
    assert meta is not None
    record = {**json.loads(meta), "layer": "../../../etc/shadow"}
    archive = write_members(
        [(m, json.dumps(record).encode()) if m.name.endswith("s1/meta.json") else (m, d)
         for m, d in members],
        tmp_path / "meta.tar",
    )  # fmt: skip
    assert_refused(vzd, archive, "s1")
    host.intact()


def test_a_vm_export_round_trips(exports: Exports, vzd: Daemon) -> None:
    r = vzd.vz("import", str(exports.vm), "--name", "hvm2")
    assert r.returncode == 0, r.stderr
    vzd.client().delete_instance("hvm2")


# -- the header: bounded, strict, names checked --------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_huge_or_endless_header_is_refused_without_growing_the_daemon(
    exports: Exports, vzd: Daemon, tmp_path: Path
) -> None:
    assert vzd.proc is not None
    rss = _rss_kib(vzd.proc.pid)
    members = read_members(exports.container)
    endless = replace(members, "vzkit-export.json",
                      entry("vzkit-export.json", tarfile.SYMTYPE, link="/dev/zero"))  # fmt: skip
    assert_refused(vzd, write_members(endless, tmp_path / "zero.tar"), "vzkit-export.json")
    # A sparse header of 1 GiB in an archive of a few KiB (GNU tar keeps it sparse).
    stage = tmp_path / "stage"
    (stage / "instance").mkdir(parents=True)
    with (stage / "vzkit-export.json").open("wb") as f:
        f.write(b'{"format": 1, "x": "')
        f.truncate(1 << 30)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-C", str(stage), "--sparse", "-cf", str(archive),
                    "vzkit-export.json", "instance"], check=True)  # fmt: skip
    assert archive.stat().st_size < 64 * 1024
    assert_refused(vzd, archive, "vzkit-export.json")
    assert _rss_kib(vzd.proc.pid) - rss < 200 * 1024, "vzd grew while reading a header"


def test_an_archive_name_must_obey_the_name_rules(
    exports: Exports, vzd: Daemon, tmp_path: Path
) -> None:
    members = read_members(exports.container)
    header = header_of(members)
    instance = copy.deepcopy(header["instance"])
    assert isinstance(instance, dict)
    instance["name"] = "../../etc"
    archive = write_members(with_header(members, {**header, "instance": instance}),
                            tmp_path / "name.tar")  # fmt: skip
    before = set(os.listdir(vzd.settings.instances_dir))
    r = vzd.vz("import", str(archive))
    err = r.stderr.decode()
    assert r.returncode == 1 and "'../../etc' is not a valid name" in err, err
    assert "hint:" in err and "--name" in err, err
    assert set(os.listdir(vzd.settings.instances_dir)) == before
    # The same archive under a name of the importer's choice is fine.
    r = vzd.vz("import", str(archive), "--name", "renamed")
    assert r.returncode == 0, r.stderr
    vzd.client().delete_instance("renamed")
    # An image name is a name too (the image store would read a path made of it).
    image = {**dict(header["image"]), "name": "../x"}  # type: ignore[call-overload]
    instance["name"], instance["image"] = "ok", "../x"
    archive = write_members(with_header(members, {**header, "instance": instance, "image": image}),
                            tmp_path / "image.tar")  # fmt: skip
    assert_refused(vzd, archive, "invalid image")


def test_stale_staging_dirs_are_removed_on_start(private_daemon: Daemon) -> None:
    d = private_daemon
    for leftover in (".import-0123abcd", ".export-4567ef01"):
        (d.settings.instances_dir / leftover / "instance").mkdir(parents=True)
    d.start()
    left = [p.name for p in d.settings.instances_dir.iterdir() if p.name.startswith(".")]
    assert left == []


# -- start never follows a link in the instance's own directory -----------------------------


def test_start_never_writes_through_links_in_the_state_dir(vzd: Daemon, host: Host) -> None:
    """Defence in depth for a state dir that got a link (an older import, a bug): the
    console log, bundle and config are opened without following it."""
    c = vzd.client()
    c.create_instance({"name": "hlink", "type": "container", "start": False})
    c.create_instance({"name": "hlinkvm", "type": "microvm", "start": False})
    try:
        ct = state_dir(vzd, "hlink")
        (ct / "console.log").unlink(missing_ok=True)
        (ct / "console.log").symlink_to(host.secret)
        with contextlib.suppress(VzError):  # refusing to start is fine; writing through is not
            c.start("hlink")
        host.intact()
        with contextlib.suppress(VzError):
            c.stop("hlink", force=True)
        os.rename(ct / "bundle", ct / "bundle.real")
        (ct / "bundle").symlink_to(host.folder)
        with contextlib.suppress(VzError):
            c.start("hlink")
        host.intact()
        assert not (ct / "bundle.real" / "config.json").is_symlink()
        vm = state_dir(vzd, "hlinkvm")
        (vm / "console.log").unlink(missing_ok=True)
        (vm / "console.log").symlink_to(host.secret)
        with contextlib.suppress(VzError):
            c.start("hlinkvm")
        host.intact()
    finally:
        c.delete_instance("hlink", force=True)
        c.delete_instance("hlinkvm", force=True)
