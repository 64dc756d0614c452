"""Stopping a fork-bombed container: vz-runtime against runc, in the same run.

Each round starts a container (busybox bundle, its own cgroup, a pids limit) whose process
is a fork bomb that never gives up (every process forks for ever and reaps its children,
so each slot a kill frees is taken again at once), waits until the bomb is at the limit,
then times ``kill --all KILL`` followed by ``delete --force``: what ContainerEngine.stop
does with a container that will not stop. Both runtimes get the same bundle, with and
without a pid namespace (without one, the kernel does not kill the bomb with the init).

vz-runtime freezes the cgroup, kills everything, thaws it, until it is empty; runc's
``kill --all`` freezes, signals and thaws once. Needs root, gcc, /bin/busybox and runc.

The engine row does what a user does: ``vz stop --force`` (the SDK's stop) of a container
of a private vzd (user-namespaced, ``limits.processes`` as the limit) whose shell fork bomb
is at its limit, until the instance is stopped and its cgroup gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a file, only benchmarks/ is on sys.path: the imports below need the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import private_daemon

VZ_RUNTIME = shutil.which("vz-runtime", path=str(Path(sys.executable).parent)) or "vz-runtime"
CG = Path("/sys/fs/cgroup")
BOMB_C = """#include <sys/wait.h>
#include <unistd.h>
int main(void) { for (;;) { fork(); while (waitpid(-1, 0, WNOHANG) > 0); } }
"""


def make_bundle(work: Path, pid_namespace: bool, parent: str, limit: int) -> Path:
    bundle = work / f"bundle-{'pidns' if pid_namespace else 'hostpid'}"
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True)
    (work / "bomb.c").write_text(BOMB_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(rootfs / "bin" / "bomb"),
                    str(work / "bomb.c")], check=True)  # fmt: skip
    subprocess.run([VZ_RUNTIME, "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(terminal=False, args=["/bin/bomb"])
    config["root"]["readonly"] = False
    linux = config["linux"]
    linux["resources"] = {"pids": {"limit": limit}}
    linux["cgroupsPath"] = f"/{parent}/bomb"
    if not pid_namespace:
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "pid"]
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def pids_dir(parent: str) -> Path:
    v2 = (CG / "cgroup.controllers").exists() and (CG / "cgroup.controllers").read_text().strip()
    return CG / parent / "bomb" if v2 else CG / "pids" / parent / "bomb"


def saturated(parent: str) -> bool:
    return at_limit(pids_dir(parent))


def at_limit(group: Path) -> bool:
    """Whether a fork in the group has failed at its pids limit yet."""
    for line in (group / "pids.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "max" and int(value) > 0:
            return True
    return False


def stop_time(runtime: list[str], bundle: Path, parent: str, cid: str) -> float:
    """Start the bomb, wait until it is at its limit, time kill --all + delete --force."""
    subprocess.run([*runtime, "run", "--detach", "--bundle", str(bundle), cid], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not saturated(parent):
        if time.monotonic() > deadline:
            raise SystemExit(f"{cid}: the bomb did not reach its pids limit in 30 s")
        time.sleep(0.01)
    time.sleep(0.2)  # at full strength for a moment
    start = time.perf_counter()
    subprocess.run([*runtime, "kill", "--all", cid, "KILL"], check=False,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*runtime, "delete", "--force", cid], check=True)
    elapsed = time.perf_counter() - start
    left = pids_dir(parent) / "cgroup.procs"
    if left.exists() and left.read_text().split():
        raise SystemExit(f"{cid}: processes survived: {left.read_text().split()[:10]}")
    return elapsed


# In the background, its output nowhere: the exec returns while the bomb goes on.
SHELL_BOMB = "b() { b | b & }; (b) </dev/null >/dev/null 2>&1 &"


def _pids_dir_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(",") or controllers == "":
            top = CG / "pids" if controllers else CG
            return top / path.lstrip("/")
    raise SystemExit(f"no pids cgroup for pid {pid}")


def engine_stop_times(limit: int, runs: int) -> list[float]:
    """``stop --force`` through vzd of a container whose fork bomb is at its limit."""
    times = []
    with private_daemon() as (_env, client):
        client.create_instance(
            {"name": "bomb", "type": "container", "start": False, "nics": [],
             "limits": {"processes": limit}}
        )  # fmt: skip
        for _ in range(runs):
            client.start("bomb")
            pid = client.get_instance("bomb").pid
            assert pid
            pids = _pids_dir_of(pid)
            client.exec_capture(
                "bomb", ["sh", "-c", "b() { b | b & }; (b) </dev/null >/dev/null 2>&1 &"]
            )
            deadline = time.monotonic() + 30
            while not any(
                ln == f"max {n}" and int(n) > 0
                for ln in (pids / "pids.events").read_text().splitlines()
                for n in [ln.partition(" ")[2]]
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("engine: the bomb did not reach its pids limit in 30 s")
                time.sleep(0.01)
            time.sleep(0.2)
            start = time.perf_counter()
            client.stop("bomb", force=True)
            times.append(time.perf_counter() - start)
            if pids.exists() and (pids / "cgroup.procs").read_text().split():
                raise SystemExit("engine: processes survived vz stop --force")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=512, help="pids.limit of the container")
    parser.add_argument("--no-engine", action="store_true", help="skip the row through vzd")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/forkbomb.py needs root")
    runc = shutil.which("runc")
    work = Path(tempfile.mkdtemp(prefix="vz-forkbomb-"))
    parent = f"vz-bench-bomb-{os.getpid()}"
    runtimes: dict[str, list[str]] = {"vz-runtime": [VZ_RUNTIME, "--root", str(work / "vz")]}
    if runc:
        runtimes["runc"] = [runc, "--root", str(work / "runc")]
    results: dict[str, float] = {}
    try:
        for pid_namespace in (True, False):
            bundle = make_bundle(work, pid_namespace, parent, args.limit)
            label = "pid namespace" if pid_namespace else "no pid namespace"
            for name, runtime in runtimes.items():
                times = [
                    stop_time(runtime, bundle, parent, f"bomb-{name}-{i}") for i in range(args.runs)
                ]
                results[f"{name}, {label}"] = statistics.median(times)
        if not args.no_engine:
            engine = statistics.median(engine_stop_times(args.limit, args.runs))
            results["vz stop --force (vzd), pid namespace"] = engine
        print(f"stop a fork bomb (pids.limit {args.limit}): kill --all KILL + delete --force, "
              f"median of {args.runs}")  # fmt: skip
        for key, t in results.items():
            name, _, label = key.partition(", ")
            peer = results.get(f"runc, {label}")
            ratio = f"   {t / peer:.2f}x runc" if peer else ""
            print(f"  {key:<40} {t * 1000:8.1f} ms{ratio}")
    finally:
        _cleanup(runtimes, work, parent)


def _cleanup(runtimes: dict[str, list[str]], work: Path, parent: str) -> None:
    for runtime in runtimes.values():
        root = Path(runtime[-1])
        for cid in os.listdir(root) if root.is_dir() else []:
            if not cid.startswith("."):
                subprocess.run([*runtime, "delete", "--force", cid], capture_output=True)
    # The cgroup parent, in every hierarchy (v1) or the one tree (v2): empty by now.
    for d in [*CG.glob(f"*/{parent}"), CG / parent]:
        for child in [*d.glob("*/"), d] if d.is_dir() else []:
            with contextlib.suppress(OSError):
                child.rmdir()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
