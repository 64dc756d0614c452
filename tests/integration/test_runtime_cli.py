"""vz-runtime through its command line, with real namespaces, cgroups and a busybox rootfs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
RUNTIME = [sys.executable, "-m", "vzkit_runtime"]
CGROUP_ROOT = Path("/sys/fs/cgroup")

if not BUSYBOX.exists():  # pragma: no cover - depends on the host
    pytest.skip("needs /bin/busybox (busybox-static)", allow_module_level=True)


class Runtime:
    """vz-runtime with a private --root; remembers ids to clean up."""

    command: list[str] = RUNTIME

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids: set[str] = set()

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        # Files, not pipes: a detached container inherits the runtime's stdio and would
        # hold a pipe open until it exits.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = subprocess.run(
                [*self.command, "--root", str(self.root), *args],
                stdout=out,
                stderr=err,
                timeout=timeout,
                **kw,
            ).returncode
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(
                args, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )
        if check and proc.returncode != 0:
            raise AssertionError(f"vz-runtime {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
        return proc

    def state(self, cid: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self("state", cid).stdout)
        return out

    def new_id(self) -> str:
        cid = f"t-{uuid.uuid4().hex[:10]}"
        self.ids.add(cid)
        CREATED.add(cid)
        return cid

    def cleanup(self) -> None:
        for cid in self.ids:
            self("delete", "--force", cid, check=False)
            for d in CGROUP_ROOT.glob(f"*/vz-runtime/{cid}"):
                with contextlib.suppress(OSError):
                    d.rmdir()
        shutil.rmtree(self.root, ignore_errors=True)


#: Every container id this test session made: the leftover check looks for these only (other
#: sessions on the same host make containers of their own meanwhile).
CREATED: set[str] = set()


def _runtime_parents() -> set[Path]:
    return set(CGROUP_ROOT.glob("*/vz-runtime"))


@pytest.fixture(scope="module", autouse=True)
def _leave_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the module: remove the `vz-runtime` cgroup parents its containers created
    (only those absent before, and only when empty: rmdir refuses a cgroup with children,
    so a parent something else uses meanwhile stays), and check that no container
    process or mount of a test bundle is left on the host."""
    before = _runtime_parents()
    yield
    for parent in sorted(_runtime_parents() - before):
        with contextlib.suppress(OSError):
            parent.rmdir()
    # This session's own files only: other pytest sessions on the host use the same
    # /tmp/pytest-of-USER tree meanwhile.
    base = str(tmp_path_factory.getbasetemp())
    with open("/proc/self/mountinfo") as f:
        leaked = [line for line in f if f" {base}/" in line]
    assert leaked == [], f"mounts left behind: {leaked}"
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        text = ""
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
        if any(f"/vz-runtime/{cid}" in text for cid in CREATED):
            left.append(pid)
    assert left == [], f"container processes left behind: {left}"


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    r = Runtime(tmp_path / "root")
    try:
        yield r
    finally:
        r.cleanup()


BundleFactory = Callable[..., Path]


@pytest.fixture
def bundle(tmp_path: Path, rt: Runtime) -> BundleFactory:
    """A busybox bundle from `vz-runtime spec`, edited by ``edit``."""
    counter = [0]

    def make(args: list[str], edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
        counter[0] += 1
        b = tmp_path / f"bundle{counter[0]}"
        rootfs = b / "rootfs"
        for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        rt("spec", "--bundle", str(b))
        config = json.loads((b / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = args
        if edit:
            edit(config)
        (b / "config.json").write_text(json.dumps(config))
        return b

    return make


def _cgroup_dirs(cid: str) -> list[Path]:
    return list(CGROUP_ROOT.glob(f"*/vz-runtime/{cid}"))


def _assert_nothing_left(rt: Runtime, cid: str) -> None:
    assert not (rt.root / cid).exists(), "state dir left behind"
    assert _cgroup_dirs(cid) == [], "cgroup left behind"
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert cid not in out, "process left behind"


# ---------------------------------------------------------------------------- lifecycle


def test_lifecycle(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    b = bundle(["sleep", "100"])
    cid = rt.new_id()
    pid_file = tmp_path / "pid"
    rt("create", "--bundle", str(b), "--pid-file", str(pid_file), cid)
    st = rt.state(cid)
    assert st["status"] == "created"
    assert st["pid"] > 0 and int(pid_file.read_text()) == st["pid"]
    assert st["bundle"] == str(b) and st["ociVersion"].startswith("1.")
    assert _cgroup_dirs(cid)
    rt("start", cid)
    assert rt.state(cid)["status"] == "running"
    listed = json.loads(rt("list", "--format", "json").stdout)
    assert [c["id"] for c in listed] == [cid]
    assert st["pid"] in json.loads(rt("ps", "--format", "json", cid).stdout)
    rt("kill", cid, "KILL")
    assert wait_for(lambda: rt.state(cid)["status"] == "stopped", 5)
    rt("delete", cid)
    _assert_nothing_left(rt, cid)


def test_run_exit_codes(rt: Runtime, bundle: BundleFactory) -> None:
    assert rt("run", "--bundle", str(bundle(["/bin/true"])), rt.new_id()).returncode == 0
    proc = rt("run", "--bundle", str(bundle(["sh", "-c", "exit 3"])), rt.new_id(), check=False)
    assert proc.returncode == 3
    # Only the runtime's own cache (compiled seccomp programs) stays in the root.
    assert [p.name for p in rt.root.iterdir()] == [".cache"]


def test_delete_running_needs_force(rt: Runtime, bundle: BundleFactory) -> None:
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", str(bundle(["sleep", "100"])), cid)
    proc = rt("delete", cid, check=False)
    assert proc.returncode != 0 and "running" in proc.stderr
    rt("delete", "--force", cid)
    _assert_nothing_left(rt, cid)


# ---------------------------------------------------------------------------- isolation


def _run_sh(rt: Runtime, b: Path) -> subprocess.CompletedProcess[str]:
    return rt("run", "--bundle", str(b), rt.new_id(), check=False)


def test_isolation(rt: Runtime, bundle: BundleFactory) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["hostname"] = "boxy"

    script = (
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; ps -o pid | wc -l; "
        "ip -o link | cut -d: -f2"
    )
    out = _run_sh(rt, bundle(["sh", "-c", script], edit))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sh -c")  # PID 1 is the container's process
    assert lines[1] == "boxy"
    assert int(lines[2]) <= 5  # header + sh + ps + wc: host processes are invisible
    assert [x.strip() for x in lines[3:]] == ["lo"]


def test_readonly_and_masked_paths(rt: Runtime, bundle: BundleFactory) -> None:
    script = (
        "echo x > /proc/sys/kernel/domainname && echo WRITABLE; "
        "echo masked=$(cat /proc/timer_list | wc -c)"
    )
    out = _run_sh(rt, bundle(["sh", "-c", script]))
    assert "WRITABLE" not in out.stdout
    assert "Read-only file system" in out.stderr
    assert "masked=0" in out.stdout


def test_capabilities_and_seccomp(rt: Runtime, bundle: BundleFactory) -> None:
    script = "grep CapEff /proc/self/status; unshare -m true; echo unshare=$?"
    out = _run_sh(rt, bundle(["sh", "-c", script]))
    eff = int(out.stdout.split()[1], 16)
    cap_sys_admin, cap_net_bind_service = 21, 10
    assert not eff & (1 << cap_sys_admin)
    assert eff & (1 << cap_net_bind_service)
    assert "unshare=1" in out.stdout
    assert "Operation not permitted" in out.stderr


# ---------------------------------------------------------------------------- bad input


def _bad_create(rt: Runtime, b: Path, cid: str) -> str:
    proc = rt("create", "--bundle", str(b), cid, check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ")
    _assert_nothing_left(rt, cid)
    return proc.stderr


def test_malformed_config(rt: Runtime, bundle: BundleFactory) -> None:
    b = bundle(["true"])
    (b / "config.json").write_text("{not json")
    assert "malformed" in _bad_create(rt, b, rt.new_id())


def test_missing_rootfs(rt: Runtime, bundle: BundleFactory) -> None:
    b = bundle(["true"])
    shutil.rmtree(b / "rootfs")
    assert "rootfs" in _bad_create(rt, b, rt.new_id())


def test_unknown_namespace(rt: Runtime, bundle: BundleFactory) -> None:
    b = bundle(["true"], lambda c: c["linux"]["namespaces"].append({"type": "bogus"}))
    assert "unknown namespace type 'bogus'" in _bad_create(rt, b, rt.new_id())


def test_invalid_id(rt: Runtime, bundle: BundleFactory) -> None:
    assert "invalid container id" in _bad_create(rt, bundle(["true"]), "bad/id")


def test_duplicate_id(rt: Runtime, bundle: BundleFactory) -> None:
    b = bundle(["sleep", "100"])
    cid = rt.new_id()
    rt("create", "--bundle", str(b), cid)
    proc = rt("create", "--bundle", str(b), cid, check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert rt.state(cid)["status"] == "created"  # the first one is untouched


def test_init_failure_is_reported_and_unwound(rt: Runtime, bundle: BundleFactory) -> None:
    b = bundle(["no-such-binary"])
    assert "executable file not found" in _bad_create(rt, b, rt.new_id())


def test_rlimit_above_hard_limit_is_explained(rt: Runtime, bundle: BundleFactory) -> None:
    def edit(c: dict[str, Any]) -> None:
        big = 1 << 40
        c["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": big, "hard": big}]

    err = _bad_create(rt, bundle(["true"], edit), rt.new_id())
    assert "RLIMIT_NOFILE" in err and "CAP_SYS_RESOURCE" in err


# ---------------------------------------------------------------------------- live operations


@pytest.fixture
def running(rt: Runtime, bundle: BundleFactory) -> str:
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", str(bundle(["sleep", "100"])), cid)
    assert rt.state(cid)["status"] == "running"
    return cid


def test_exec(rt: Runtime, running: str) -> None:
    assert rt("exec", running, "hostname").stdout.strip() == "vz"
    assert rt("exec", running, "--", "sh", "-c", "exit 5", check=False).returncode == 5
    out = rt("exec", "--env", "FOO=bar", "--cwd", "/tmp", running, "sh", "-c", "echo $FOO $PWD")
    assert out.stdout.split() == ["bar", "/tmp"]
    # The exec'd process shares the pid namespace: it sees the init as PID 1.
    assert "sleep" in rt("exec", running, "cat", "/proc/1/cmdline").stdout


def test_pause_resume(rt: Runtime, running: str) -> None:
    rt("pause", running)
    assert rt.state(running)["status"] == "paused"
    rt("resume", running)
    assert rt.state(running)["status"] == "running"


def test_update_memory(rt: Runtime, running: str) -> None:
    limit = 96 * 1024 * 1024
    rt("update", "--memory", str(limit), running)
    v1 = CGROUP_ROOT / "memory" / "vz-runtime" / running / "memory.limit_in_bytes"
    v2 = CGROUP_ROOT / "vz-runtime" / running / "memory.max"
    assert (v1 if v1.exists() else v2).read_text().strip() == str(limit)


def test_console_socket(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["process"]["terminal"] = True

    b = bundle(["sh", "-c", "tty; echo hello-from-pty"], edit)
    sock_path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    cid = rt.new_id()
    argv = [*RUNTIME, "--root", str(rt.root), "create", "--bundle", str(b)]
    proc = subprocess.Popen(
        [*argv, "--console-socket", str(sock_path), cid],
        stderr=subprocess.PIPE,
    )
    server.settimeout(20)
    conn, _ = server.accept()
    _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
    conn.close()
    server.close()
    assert proc.wait(timeout=20) == 0
    assert len(fds) == 1
    master = fds[0]
    rt("start", cid)
    out = b""
    deadline = time.monotonic() + 10
    while b"hello-from-pty" not in out and time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break  # EIO: the slave side closed
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert b"hello-from-pty" in out
    assert b"/dev/pts/" in out


def test_features_and_spec(rt: Runtime, tmp_path: Path) -> None:
    feats = json.loads(rt("features").stdout)
    assert feats["ociVersionMin"].startswith("1.")
    assert "pid" in feats["linux"]["namespaces"]
    assert feats["linux"]["seccomp"]["enabled"] is True
    rt("spec", "--bundle", str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["process"]["args"] == ["sh"]
    assert "CAP_NET_RAW" in config["process"]["capabilities"]["bounding"]
    assert rt("spec", "--bundle", str(tmp_path), check=False).returncode != 0


def test_systemd_cgroup_is_rejected(rt: Runtime) -> None:
    proc = rt("--systemd-cgroup", "list", check=False)
    assert proc.returncode != 0 and "systemd" in proc.stderr


def test_force_delete_of_a_missing_container_succeeds(rt: Runtime) -> None:
    r = rt("delete", "--force", "never-made", check=False)
    assert r.returncode == 0, r.stderr
    r = rt("delete", "never-made", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_spec_into_a_missing_directory_is_a_clear_error(rt: Runtime, tmp_path: Path) -> None:
    r = rt("spec", "--bundle", str(tmp_path / "nope"), check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
