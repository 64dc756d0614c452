"""vz-runtime against runc and crun: create+start+wait+delete of /bin/true, whole processes.

Measured from busybox bundles made by ``vz-runtime spec`` (its default config: namespaces,
seccomp, masked paths, and the default device rules, which vz-runtime applies: deny all
but null, zero, full, random, urandom, tty, console, ptmx and pts), each runtime with its
own --root, median of N runs:

- vz-runtime run                     (one process: the fast path)
- vz-runtime create/start/(wait)/delete   (four processes, as a container engine drives it)
- vz-runtime run, user namespace     (uid/gid maps: the user-namespace path)
- runc run, and runc run with the same user-namespace bundle
- crun run, inside ``unshare -m`` with /sys/fs/cgroup/unified unmounted: crun refuses the
  hybrid cgroup layout of this host otherwise (the unshare+umount cost is included, so
  crun's number is a little pessimistic).

Needs root, /bin/busybox, runc and crun (scripts/setup installs them). vz-runtime is the
launcher scripts/setup writes to .venv/bin (python -IS), the way an engine would run it.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

VZ_RUNTIME = shutil.which("vz-runtime", path=str(Path(sys.executable).parent)) or "vz-runtime"


def make_bundle(root: Path, name: str = "bundle", userns: bool = False) -> Path:
    bundle = root / name
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
    if userns:
        _user_namespace(config)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def _user_namespace(config: dict[str, Any]) -> None:
    """Root of the container mapped to host uid/gid 100000 (65536 ids)."""
    linux = config["linux"]
    linux["namespaces"].append({"type": "user"})
    for key in ("uidMappings", "gidMappings"):
        linux[key] = [{"containerID": 0, "hostID": 100_000, "size": 65_536}]
    # As runc's rootless spec: the host's /sys bound, no cgroupfs, no gid=5 devpts.
    for m in config["mounts"]:
        if m["destination"] == "/sys":
            m.update(type="none", source="/sys", options=["rbind", "nosuid", "noexec", "ro"])
        if m["destination"] == "/dev/pts":
            m["options"] = [o for o in m["options"] if o != "gid=5"]
    config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/sys/fs/cgroup"]


def timed(fns: dict[str, Callable[[str], None]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each ``fn(container_id)``. The runtimes take turns, one run each
    per round (in reverse order every other round), so that a load that comes and goes on
    a shared machine falls on all of them alike instead of on whichever ran then."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        order = list(fns.items())
        for k, (name, fn) in enumerate(order if i % 2 else order[::-1]):
            cid = f"bench-{os.getpid()}-{i}-{k if i % 2 else len(order) - 1 - k}"
            start = time.perf_counter()
            fn(cid)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def _four(base: list[str], bundle: str) -> Callable[[str], None]:
    def run(cid: str) -> None:
        sh(*base, "create", "--bundle", bundle, cid)
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


def _run(base: list[str], bundle: str) -> Callable[[str], None]:
    return lambda cid: sh(*base, "run", "--bundle", bundle, cid)


def _commands(work: Path, b: str, b_userns: str) -> dict[str, Callable[[str], None]]:
    vz = [VZ_RUNTIME, "--root", str(work / "vz")]
    fns: dict[str, Callable[[str], None]] = {
        "vz-runtime run": _run(vz, b),
        "vz-runtime run, user namespace": _run(vz, b_userns),
        "vz-runtime create+start+state+delete": _four(vz, b),
    }
    runc = shutil.which("runc")
    if runc:
        runc_cmd = [runc, "--root", str(work / "runc")]
        fns["runc run"] = _run(runc_cmd, b)
        fns["runc run, user namespace"] = _run(runc_cmd, b_userns)
        fns["runc create+start+state+delete"] = _four(runc_cmd, b)
    crun = shutil.which("crun")
    if crun:
        script = f"umount /sys/fs/cgroup/unified; exec {crun} --root {work / 'crun'} run"
        fns["crun run"] = lambda cid: sh(
            "unshare", "-m", "sh", "-c", f"{script} --bundle {b} {cid}"
        )
    return fns


def _report(results: dict[str, float], runs: int) -> None:
    base_runc = results.get("runc run")
    base_crun = results.get("crun run")
    print(f"create+start+wait+delete of /bin/true, median of {runs}")
    for name, t in results.items():
        ratios = []
        if base_runc:
            ratios.append(f"{t / base_runc:.2f}x runc")
        if base_crun:
            ratios.append(f"{t / base_crun:.2f}x crun")
        print(f"  {name:<40} {t * 1000:7.1f} ms   {'  '.join(ratios)}")
    four_runc = results.get("runc create+start+state+delete")
    if four_runc:
        four_vz = results["vz-runtime create+start+state+delete"]
        print(f"  four commands, like for like: {four_vz / four_runc:.2f}x runc")
    userns_runc = results.get("runc run, user namespace")
    if userns_runc:
        vz_userns = results["vz-runtime run, user namespace"]
        print(f"  user namespace, like for like: {vz_userns / userns_runc:.2f}x runc")
    print("targets: vz-runtime run <= 1.0x runc and <= 2.0x crun")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/runtime.py needs root")
    work = Path(tempfile.mkdtemp(prefix="vz-runtime-bench-"))
    work.chmod(0o755)  # the user namespace's root (host uid 100000) must reach its rootfs
    # vz-runtime's default cgroup parent: removed after if this run made it (and it is
    # empty: rmdir refuses a cgroup something else still uses).
    parents_before = set(Path("/sys/fs/cgroup").glob("*/vz-runtime"))
    try:
        b = str(make_bundle(work))
        b_userns = str(make_bundle(work, "bundle-userns", userns=True))
        _report(timed(_commands(work, b, b_userns), args.runs), args.runs)
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
