"""vz-runtime's cgroup work on a real cgroup v2 (unified-only) kernel: run inside the
Debian guest by test_runtime_cgroup2_vm.py, which pushes vz-runtime and a busybox bundle
there. Prints one JSON object of what it found; the test asserts on it.

Only the guest's python3-minimal, vzkit_runtime and the few stdlib extension modules the
test pushes with it (the guest lacks _json, _ctypes and ctypes): no pytest here.
Usage: python3 -I -S cgroup2_guest.py DIR (DIR holds vzkit_runtime/, lib/, bundle/rootfs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = sys.argv[1]
sys.path[:0] = [HERE, f"{HERE}/lib"]

from vzkit_runtime import cgroups  # noqa: E402
from vzkit_runtime import jsonfast as json  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CG = "/sys/fs/cgroup"
PARENT = "vzrt-test"
ROOT = "/run/vzrt-test"
RT = [sys.executable, "-I", "-S", f"{HERE}/vz-runtime", "--root", ROOT]
MiB = 1 << 20
PROBE = """
try() { if out=$(sh -c "$2" 2>&1); then echo "$1=OK"; else echo "$1=$out"; fi; }
try mknod-kvm 'mknod /tmp/kvm c 10 232'
try mknod-loop 'mknod /tmp/loop b 7 1'
try open-loop ': < /dev/loop0'
try null 'echo x > /dev/null && : < /dev/null'
try zero 'head -c 4 /dev/zero | wc -c | grep -q 4'
try urandom 'head -c 4 /dev/urandom | wc -c | grep -q 4'
"""


def rt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # Files, not pipes: a detached container inherits the runtime's stdio and would hold
    # a pipe open for its whole life.
    with open(f"{HERE}/out", "w+") as out, open(f"{HERE}/err", "w+") as err:
        code = subprocess.run(
            [*RT, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=120
        ).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(args, code, out.read(), err.read())
    if check and proc.returncode:
        raise SystemExit(f"vz-runtime {' '.join(args)}: {proc.stderr}")
    return proc


def bundle(cid: str, args: list[str], resources: dict[str, Any], pid_ns: bool = True) -> str:
    b = f"{HERE}/bundles/{cid}"
    os.makedirs(b)
    rt("spec", "--bundle", b)
    with open(f"{b}/config.json") as f:
        config = json.loads(f.read())
    config["process"].update(terminal=False, args=args)
    config["root"] = {"path": f"{HERE}/bundle/rootfs", "readonly": False}
    linux = config["linux"]
    linux["cgroupsPath"] = f"/{PARENT}/{cid}"
    linux["resources"] = resources
    linux["devices"] = [{"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0}]
    if not pid_ns:
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "pid"]
    with open(f"{b}/config.json", "w") as f:
        f.write(json.dumps(config))
    return b


def read(cid: str, name: str) -> str:
    with open(f"{CG}/{PARENT}/{cid}/{name}") as f:
        return f.read().strip()


def keyed(cid: str, name: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in read(cid, name).splitlines())


def wait(cond: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def limits(out: dict[str, Any]) -> None:
    resources = {
        "memory": {"limit": 64 * MiB, "reservation": 16 * MiB},
        "cpu": {"shares": 2048, "quota": 25_000, "period": 50_000},
        "pids": {"limit": 77},
    }
    rt("run", "--detach", "--bundle", bundle("limits", ["sleep", "1000"], resources), "limits")
    names = ("memory.max", "memory.low", "cpu.max", "cpu.weight", "pids.max")
    out["limits"] = {n: read("limits", n) for n in names}
    rt("update", "--memory", str(32 * MiB), "--cpu-quota", "10000", "--cpu-period", "20000",
       "limits")  # fmt: skip
    out["updated"] = {n: read("limits", n) for n in ("memory.max", "cpu.max")}
    rt("pause", "limits")
    out["paused"] = keyed("limits", "cgroup.events").get("frozen")
    rt("resume", "limits")
    out["resumed"] = keyed("limits", "cgroup.events").get("frozen")
    rt("delete", "--force", "limits")
    out["limits_removed"] = not os.path.exists(f"{CG}/{PARENT}/limits")


def devices(out: dict[str, Any]) -> None:
    proc = rt("run", "--bundle", bundle("devices", ["sh", "-c", PROBE], {}), "devices")
    out["devices"] = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def fork_bomb(out: dict[str, Any]) -> None:
    b = bundle("bomb", ["/bin/bomb"], {"pids": {"limit": 64}}, pid_ns=False)
    rt("run", "--detach", "--bundle", b, "bomb")
    out["bomb_saturated"] = wait(lambda: int(keyed("bomb", "pids.events").get("max", 0)) > 0, 60)
    out["bomb_running"] = len(read("bomb", "cgroup.procs").split())
    rt("kill", "--all", "bomb", "KILL")
    out["bomb_left"] = read("bomb", "cgroup.procs").split()
    out["bomb_unpopulated"] = wait(lambda: keyed("bomb", "cgroup.events")["populated"] == "0", 30)
    rt("delete", "--force", "bomb")
    out["bomb_removed"] = not os.path.exists(f"{CG}/{PARENT}/bomb")


def main() -> None:
    out: dict[str, Any] = {"version": cgroups.hierarchies()[0]}
    with open(f"{CG}/cgroup.controllers") as f:
        out["controllers"] = f.read().split()
    try:
        for check in (limits, devices, fork_bomb):
            check(out)
    finally:
        for cid in ("limits", "devices", "bomb"):
            rt("delete", "--force", cid, check=False)
        try:
            os.rmdir(f"{CG}/{PARENT}")
        except OSError as exc:
            out["parent_left"] = str(exc)
        sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
