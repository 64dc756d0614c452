"""vz-runtime against runc and crun: create+start+wait+delete of /bin/true, whole processes.

Measured from one busybox bundle, each runtime with its own --root, median of N runs:

- vz-runtime run                     (one process: the fast path)
- vz-runtime create/start/(wait)/delete   (four processes, as a container engine drives it)
- runc run
- crun run, inside ``unshare -m`` with /sys/fs/cgroup/unified unmounted: crun refuses the
  hybrid cgroup layout of this host otherwise (the unshare+umount cost is included, so
  crun's number is a little pessimistic).
- vz-runtime run and runc run of the same container in a user namespace (as the container
  engine runs them by default: root mapped to 1000000, a rootfs owned by that id), beside
  their runs without one.

Every bundle has the default device cgroup rules (deny all, then the OCI allow-list).

Needs root, /bin/busybox, runc and crun (scripts/setup installs them). vz-runtime is the
launcher scripts/setup writes to .venv/bin (python -IS), the way an engine would run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

VZ_RUNTIME = shutil.which("vz-runtime", path=str(Path(sys.executable).parent)) or "vz-runtime"


def make_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "true").symlink_to("busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    subprocess.run([VZ_RUNTIME, "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


USERNS_BASE = 1000000


def make_userns_bundle(root: Path, bundle: Path) -> Path:
    """The same container with a user namespace, its rootfs owned by the mapped root."""
    dest = root / "bundle-userns"
    shutil.copytree(bundle, dest, symlinks=True)
    for path in [dest / "rootfs", *(dest / "rootfs").rglob("*")]:
        os.lchown(path, USERNS_BASE, USERNS_BASE)
    config = json.loads((dest / "config.json").read_text())
    linux = config["linux"]
    linux["namespaces"].append({"type": "user"})
    mapping = [{"containerID": 0, "hostID": USERNS_BASE, "size": 65536}]
    linux["uidMappings"] = linux["gidMappings"] = mapping
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


class Timing(NamedTuple):
    wall: float  # median seconds
    cpu: float  # mean CPU seconds (user + system) of the processes the run waited for


def timed(fn: Callable[[str], None], runs: int, warmup: int = 3) -> Timing:
    """Median wall time of ``fn(container_id)``, and its mean CPU time: on a loaded
    machine the wall time says more about the neighbours than about the runtime. (CPU
    counts reaped processes: an init that ``create`` reparents away is not among them.)"""
    times: list[float] = []
    cpu = 0.0
    for i in range(warmup + runs):
        cid = f"bench-{os.getpid()}-{i}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        fn(cid)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if i >= warmup:
            times.append(elapsed)
            cpu += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Timing(statistics.median(times), cpu / runs)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/runtime.py needs root")
    work = Path(tempfile.mkdtemp(prefix="vz-runtime-bench-"))
    # vz-runtime's default cgroup parent: removed after if this run made it (and it is
    # empty: rmdir refuses a cgroup something else still uses).
    parents_before = set(Path("/sys/fs/cgroup").glob("*/vz-runtime"))
    try:
        bundle = make_bundle(work)
        b = str(bundle)
        work.chmod(0o711)  # the mapped root passes on its way to the rootfs
        b_userns = str(make_userns_bundle(work, bundle))
        vz_root = str(work / "vz")
        results: dict[str, Timing] = {}

        def vz_run(cid: str) -> None:
            sh(VZ_RUNTIME, "--root", vz_root, "run", "--bundle", b, cid)

        def four(base: list[str]) -> Callable[[str], None]:
            def run(cid: str) -> None:
                sh(*base, "create", "--bundle", b, cid)
                sh(*base, "start", cid)
                # The init is not our child: wait as an engine would, by polling the state.
                while (
                    '"stopped"'
                    not in subprocess.run(
                        [*base, "state", cid], capture_output=True, text=True, check=True
                    ).stdout
                ):
                    time.sleep(0.0005)
                sh(*base, "delete", cid)

            return run

        results["vz-runtime run"] = timed(vz_run, args.runs)
        results["vz-runtime run, user namespace"] = timed(
            lambda cid: sh(VZ_RUNTIME, "--root", vz_root, "run", "--bundle", b_userns, cid),
            args.runs,
        )
        results["vz-runtime create+start+state+delete"] = timed(
            four([VZ_RUNTIME, "--root", vz_root]), args.runs
        )
        runc = shutil.which("runc")
        if runc:
            runc_root = str(work / "runc")
            results["runc run"] = timed(
                lambda cid: sh(runc, "--root", runc_root, "run", "--bundle", b, cid), args.runs
            )
            results["runc create+start+state+delete"] = timed(
                four([runc, "--root", runc_root]), args.runs
            )
            results["runc run, user namespace"] = timed(
                lambda cid: sh(runc, "--root", runc_root, "run", "--bundle", b_userns, cid),
                args.runs,
            )
        crun = shutil.which("crun")
        if crun:
            crun_root = str(work / "crun")
            script = f"umount /sys/fs/cgroup/unified; exec {crun} --root {crun_root} run"
            results["crun run"] = timed(
                lambda cid: sh("unshare", "-m", "sh", "-c", f"{script} --bundle {b} {cid}"),
                args.runs,
            )
        base_runc = results.get("runc run")
        base_crun = results.get("crun run")
        print(f"create+start+wait+delete of /bin/true, median of {args.runs} (CPU: mean)")
        for name, t in results.items():
            ratios = []
            if base_runc:
                ratios.append(f"{t.wall / base_runc.wall:.2f}x runc")
            if base_crun:
                ratios.append(f"{t.wall / base_crun.wall:.2f}x crun")
            print(f"  {name:<40} {t.wall * 1000:7.1f} ms   {'  '.join(ratios):<24}"
                  f"CPU {t.cpu * 1000:6.1f} ms")  # fmt: skip
        pairs = {
            "four commands": "create+start+state+delete",
            "user namespace": "run, user namespace",
        }
        for label, row in pairs.items():
            vz, peer = results[f"vz-runtime {row}"], results.get(f"runc {row}")
            if peer:
                print(f"  {label}, like for like: {vz.wall / peer.wall:.2f}x runc "
                      f"(CPU {vz.cpu / peer.cpu:.2f}x)")  # fmt: skip
        print("targets: vz-runtime run <= 1.0x runc and <= 2.0x crun")
    finally:
        for rt_root in (work / "vz", work / "runc", work / "crun"):
            if rt_root.is_dir():
                # Dot names are the runtime's own (vz-runtime's .cache), not containers.
                for cid in (n for n in os.listdir(rt_root) if not n.startswith(".")):
                    exe = VZ_RUNTIME if rt_root.name == "vz" else rt_root.name
                    subprocess.run(
                        [exe, "--root", str(rt_root), "delete", "--force", cid],
                        capture_output=True,
                    )
        shutil.rmtree(work, ignore_errors=True)
        for parent in set(Path("/sys/fs/cgroup").glob("*/vz-runtime")) - parents_before:
            with contextlib.suppress(OSError):
                parent.rmdir()


if __name__ == "__main__":
    main()
