"""vz-runtime through its command line: user namespaces and OCI hooks."""

# ruff: noqa: F811  (rt, bundle: fixtures imported from test_runtime_cli, used by name)

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import wait_for
from tests.integration.test_runtime_cli import (  # noqa: F401 - fixtures used by name
    BUSYBOX,
    BundleFactory,
    Runtime,
    _assert_nothing_left,
    _leave_nothing_behind,
    bundle,
    rt,
)

pytestmark = pytest.mark.integration

HOST_ID = 100000
SIZE = 65536


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 tmp tree, so a mapped uid can traverse it."""
    d = Path(tempfile.mkdtemp(prefix="vz-userns-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.lchown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _bind(c: dict[str, Any], source: Path, dest: str) -> None:
    c["mounts"].append(
        {"destination": dest, "type": "bind", "source": str(source), "options": ["rbind", "rw"]}
    )


def _userns(c: dict[str, Any]) -> None:
    c["linux"]["namespaces"].append({"type": "user"})
    c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": SIZE}]
    c["linux"]["gidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": SIZE}]
    # sysfs and cgroupfs cannot be mounted from a user namespace without a net namespace
    # of its own; the rootless default binds /sys instead.
    for m in c["mounts"]:
        if m["destination"] == "/sys":
            m.update(type="none", source="/sys", options=["rbind", "nosuid", "noexec", "ro"])
    c["mounts"] = [m for m in c["mounts"] if m["destination"] != "/sys/fs/cgroup"]
    for m in c["mounts"]:
        if m["destination"] == "/dev/pts":
            m["options"] = [o for o in m["options"] if o != "gid=5"]


# ---------------------------------------------------------------------------- user namespaces


def test_user_namespace_mapping(rt: Runtime, bundle: BundleFactory, shared_dir: Path) -> None:
    out_dir = shared_dir / "out"
    out_dir.mkdir()
    os.chown(out_dir, HOST_ID, HOST_ID)

    def edit(c: dict[str, Any]) -> None:
        _userns(c)
        _bind(c, out_dir, "/out")

    script = (
        "echo uid=$(id -u) gid=$(id -g); cat /proc/self/uid_map /proc/self/gid_map; "
        "touch /out/made; "
        "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo SYSCTL-WRITABLE; "
        "echo x > /proc/sys/kernel/domainname 2>/dev/null && echo DOMAIN-WRITABLE; "
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNTED; "
        "cat /proc/self/status | grep CapEff; echo done"
    )
    b = bundle(["sh", "-c", script], edit)
    moved = shutil.move(str(b), str(shared_dir / "bundle"))
    _chown_tree(Path(moved) / "rootfs", HOST_ID, HOST_ID)
    proc = rt("run", "--bundle", moved, rt.new_id(), check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "uid=0 gid=0"
    assert lines[1].split() == ["0", str(HOST_ID), str(SIZE)]
    assert lines[2].split() == ["0", str(HOST_ID), str(SIZE)]
    made = (out_dir / "made").stat()
    assert (made.st_uid, made.st_gid) == (HOST_ID, HOST_ID)
    # Root in the namespace is not host root: host sysctls, mounts stay out of reach.
    assert "SYSCTL-WRITABLE" not in proc.stdout
    assert "DOMAIN-WRITABLE" not in proc.stdout
    assert "MOUNTED" not in proc.stdout
    assert lines[-1] == "done"


def test_user_namespace_needs_mappings(rt: Runtime, bundle: BundleFactory) -> None:
    def edit(c: dict[str, Any]) -> None:
        _userns(c)
        del c["linux"]["uidMappings"]

    cid = rt.new_id()
    proc = rt("create", "--bundle", str(bundle(["true"], edit)), cid, check=False)
    assert proc.returncode != 0 and "uidMappings" in proc.stderr
    _assert_nothing_left(rt, cid)


def test_rootless_spec_runs_as_root(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    rt("spec", "--rootless", "--bundle", str(tmp_path))
    rootless = json.loads((tmp_path / "config.json").read_text())
    linux = rootless["linux"]
    assert {"type": "user"} in linux["namespaces"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": os.getuid(), "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": os.getgid(), "size": 1}]
    sys_mount = next(m for m in rootless["mounts"] if m["destination"] == "/sys")
    assert sys_mount["source"] == "/sys" and "rbind" in sys_mount["options"]

    def edit(c: dict[str, Any]) -> None:
        args = c["process"]["args"]
        c.clear()
        c.update(rootless)
        c["process"]["terminal"] = False
        c["process"]["args"] = args

    b = bundle(["sh", "-c", "id -u; cat /proc/self/uid_map; readlink /proc/self/ns/user"], edit)
    proc = rt("run", "--bundle", str(b), rt.new_id(), check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", str(os.getuid()), "1"]
    assert lines[2] != os.readlink("/proc/self/ns/user")  # a new user namespace


# ---------------------------------------------------------------------------- hooks


def _hook_script(path: Path, name: str, out: str, shell: str = "/bin/sh") -> None:
    """Save the state from stdin to <out>/<name>.json, log `<name> <status>`."""
    path.write_text(
        f"#!{shell}\n"
        f"cat > {out}/{name}.json\n"
        f'status=$(sed -n \'s/.*"status": *"\\([a-z]*\\)".*/\\1/p\' {out}/{name}.json)\n'
        f'echo "{name} $status" >> {out}/log\n'
    )
    path.chmod(0o755)


HOOKS = ("createRuntime", "createContainer", "startContainer", "poststart", "poststop")


@pytest.fixture
def hook_dir(shared_dir: Path) -> Path:
    d = shared_dir / "hooks"
    d.mkdir()
    d.chmod(0o777)
    return d


def test_hooks_order_and_state(rt: Runtime, bundle: BundleFactory, hook_dir: Path) -> None:
    hooks: dict[str, list[dict[str, Any]]] = {}
    for name in HOOKS:
        if name == "startContainer":
            # Runs inside the container: its path and output are container paths.
            _hook_script(hook_dir / f"{name}.sh", name, "/hooks")
            hooks[name] = [{"path": f"/hooks/{name}.sh"}]
        else:
            # createContainer runs in the container's namespaces but before pivot_root, so
            # it sees host paths, like the runtime-side hooks.
            _hook_script(hook_dir / f"{name}.sh", name, str(hook_dir))
            hooks[name] = [{"path": str(hook_dir / f"{name}.sh"), "timeout": 10}]

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = hooks
        _bind(c, hook_dir, "/hooks")

    b = bundle(["sleep", "100"], edit)
    cid = rt.new_id()
    rt("create", "--bundle", str(b), cid)
    pid = rt.state(cid)["pid"]
    rt("start", cid)
    assert rt.state(cid)["status"] == "running"
    rt("kill", cid, "KILL")
    assert wait_for(lambda: rt.state(cid)["status"] == "stopped", 5)
    rt("delete", cid)
    _assert_nothing_left(rt, cid)

    log = (hook_dir / "log").read_text().splitlines()
    assert log == [
        "createRuntime creating",
        "createContainer creating",
        "startContainer created",
        "poststart running",
        "poststop stopped",
    ]
    for name in HOOKS:
        st = json.loads((hook_dir / f"{name}.json").read_text())
        assert st["id"] == cid, name
        assert st["bundle"] == str(b), name
        assert st["pid"] == (0 if name == "poststop" else pid), name


def test_start_waits_for_the_start_container_hooks(
    rt: Runtime, bundle: BundleFactory, hook_dir: Path
) -> None:
    """runtime-spec orders poststart after startContainer: a slow startContainer hook still
    comes first, and a failing one fails `start` with neither the process nor poststart run."""
    for name, body in (("slow", "sleep 1; echo startContainer >> /hooks/log"), ("fail", "exit 3")):
        (hook_dir / f"{name}.sh").write_text(f"#!/bin/sh\ncat >/dev/null\n{body}\n")
        (hook_dir / f"{name}.sh").chmod(0o755)
    poststart = hook_dir / "poststart.sh"
    poststart.write_text(f"#!/bin/sh\ncat >/dev/null\necho poststart >> {hook_dir}/log\n")
    poststart.chmod(0o755)

    def hooked(start_hook: str) -> Path:
        def edit(c: dict[str, Any]) -> None:
            c["hooks"] = {
                "startContainer": [{"path": f"/hooks/{start_hook}.sh"}],
                "poststart": [{"path": str(poststart)}],
            }
            _bind(c, hook_dir, "/hooks")

        return bundle(["sh", "-c", "echo ran >> /hooks/log; exec sleep 100"], edit)

    cid = rt.new_id()
    rt("create", "--bundle", str(hooked("slow")), cid)
    rt("start", cid)
    assert wait_for(lambda: "ran" in (hook_dir / "log").read_text().split(), 10)
    log = (hook_dir / "log").read_text().split()
    # The process runs alongside poststart: only the hooks' order is fixed.
    assert [e for e in log if e != "ran"] == ["startContainer", "poststart"], log
    rt("delete", "--force", cid)

    (hook_dir / "log").unlink()
    cid = rt.new_id()
    rt("create", "--bundle", str(hooked("fail")), cid)
    assert rt("start", cid, check=False).returncode != 0
    assert wait_for(lambda: rt.state(cid)["status"] == "stopped", 5)
    assert not (hook_dir / "log").exists(), (hook_dir / "log").read_text()
    rt("delete", cid)
    _assert_nothing_left(rt, cid)


def test_create_container_script_hook(rt: Runtime, bundle: BundleFactory, hook_dir: Path) -> None:
    _hook_script(hook_dir / "cc.sh", "createContainer", str(hook_dir))

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"createContainer": [{"path": str(hook_dir / "cc.sh")}]}

    cid = rt.new_id()
    rt("create", "--bundle", str(bundle(["sleep", "100"], edit)), cid)
    assert (hook_dir / "log").read_text() == "createContainer creating\n"


def _failing_create(rt: Runtime, b: Path) -> tuple[str, str]:
    cid = rt.new_id()
    proc = rt("create", "--bundle", str(b), cid, check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    _assert_nothing_left(rt, cid)
    return cid, proc.stderr


def test_failing_create_runtime_hook(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    hook = tmp_path / "fail.sh"
    hook.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")
    hook.chmod(0o755)

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"createRuntime": [{"path": str(hook)}]}

    _, err = _failing_create(rt, bundle(["sleep", "100"], edit))
    assert "createRuntime hook" in err and str(hook) in err and "status 1" in err


def test_missing_hook_binary(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"createContainer": [{"path": str(tmp_path / "nope")}]}

    _, err = _failing_create(rt, bundle(["sleep", "100"], edit))
    assert "createContainer hook" in err and "No such file" in err


def test_hook_timeout(rt: Runtime, bundle: BundleFactory, tmp_path: Path) -> None:
    # The hook would sleep for a day: only its timeout lets create fail within rt's 30 s
    # (how soon, against runc: benchmarks/latencies.py), and the hook is killed.
    hook = tmp_path / "slow.sh"
    hook.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/hook.pid\nexec sleep 86400\n")
    hook.chmod(0o755)

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"createRuntime": [{"path": str(hook), "timeout": 1}]}

    _, err = _failing_create(rt, bundle(["sleep", "100"], edit))
    assert "timed out after 1 s" in err
    pid = int((tmp_path / "hook.pid").read_text())
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30), "the hook outlived create"


def test_poststop_runs_on_forced_delete(rt: Runtime, bundle: BundleFactory, hook_dir: Path) -> None:
    _hook_script(hook_dir / "poststop.sh", "poststop", str(hook_dir))

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"poststop": [{"path": str(hook_dir / "poststop.sh")}]}

    cid = rt.new_id()
    rt("run", "--detach", "--bundle", str(bundle(["sleep", "100"], edit)), cid)
    assert not (hook_dir / "log").exists()
    rt("delete", "--force", cid)
    _assert_nothing_left(rt, cid)
    assert (hook_dir / "log").read_text() == "poststop stopped\n"
    assert json.loads((hook_dir / "poststop.json").read_text())["id"] == cid


def test_failing_poststart_hook_only_warns(
    rt: Runtime, bundle: BundleFactory, tmp_path: Path
) -> None:
    hook = tmp_path / "fail.sh"
    hook.write_text("#!/bin/sh\nexit 2\n")
    hook.chmod(0o755)

    def edit(c: dict[str, Any]) -> None:
        c["hooks"] = {"poststart": [{"path": str(hook)}]}

    cid = rt.new_id()
    rt("create", "--bundle", str(bundle(["sleep", "100"], edit)), cid)
    proc = rt("start", cid, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "poststart hook" in proc.stderr
    assert rt.state(cid)["status"] == "running"
