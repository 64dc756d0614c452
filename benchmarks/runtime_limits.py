"""vz-runtime's CPU limits, hook timeouts and stop signal against runc: the same bundles,
each runtime with its own --root, in the same run (the numbers the test suite's
test_runtime_resources.py, test_runtime_userns_hooks.py and test_podman.py no longer
assert; they assert what holds on a loaded machine).

* CPU quota 0.5 (period 100 ms), two busy loops: CPUs used over 3 s (target 0.5 +/- 0.1).
* CPU weights 4:1 (shares 4096 and 1024), one busy loop each on one core: the ratio of
  their CPU time over 4 s (target 3 to 5).
* A live update of a busy loop to quota 0.25: CPUs used over 1.5 s after (target 0.2-0.3).
* A createRuntime hook that never ends, with a 1 s timeout: time until `create` fails.
* SIGTERM to a container whose shell traps it (what `podman stop` sends first): time from
  `kill` until the state is `stopped`.

Printed: vz-runtime's value, runc's, and vz-runtime / runc; medians of --runs. Runs as root
with /bin/busybox and runc; every container goes under a cgroup parent of the run's own,
removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median
from benchmarks.runtime import VZ_RUNTIME, make_bundle
from vzkit.host import cgroups

BUSY = "while :; do :; done"
CG = Path("/sys/fs/cgroup")


class Runner:
    """One OCI runtime with its own --root; containers under one cgroup parent."""

    def __init__(self, name: str, binary: str, work: Path, rootfs: Path, parent: str) -> None:
        self.name, self.binary, self.work, self.rootfs = name, binary, work, rootfs
        self.root = work / f"root-{name}"
        self.parent = parent
        self.ids: list[str] = []

    def __call__(self, *args: str, check: bool = True) -> int:
        # A file, not a pipe: a detached container inherits it and would hold a pipe open.
        with tempfile.TemporaryFile() as err:
            code = subprocess.run(
                [self.binary, "--root", str(self.root), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=120,
            ).returncode
            if check and code != 0:
                err.seek(0)
                raise RuntimeError(f"{self.name} {' '.join(args)}: {err.read().decode()}")
        return code

    def bundle(self, cid: str, args: list[str], resources: dict[str, Any], **extra: Any) -> Path:
        """A bundle of its own over the shared read-only rootfs."""
        config = json.loads((self.rootfs.parent / "config.json").read_text())
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["process"]["args"] = args
        config["linux"]["cgroupsPath"] = f"/{self.parent}/{cid}"
        config["linux"]["resources"] = resources
        config.update(extra)
        b = self.work / f"bundle-{cid}"
        b.mkdir()
        (b / "config.json").write_text(json.dumps(config))
        return b

    def start(self, args: list[str], resources: dict[str, Any]) -> str:
        cid = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self.ids.append(cid)
        self("run", "--detach", "--bundle", str(self.bundle(cid, args, resources)), cid)
        return cid

    def status(self, cid: str) -> str:
        out = subprocess.run(
            [self.binary, "--root", str(self.root), "state", cid], capture_output=True, check=True
        ).stdout
        return str(json.loads(out)["status"])

    def usage(self, cids: list[str], seconds: float) -> list[float]:
        """CPUs each container used over ``seconds`` of wall time."""
        groups = [cgroups.detect().open(f"{self.parent}/{c}") for c in cids]
        assert all(groups)
        start = time.monotonic()
        before = [g.stats().cpu_usage_ns for g in groups if g]
        time.sleep(seconds)
        after = [g.stats().cpu_usage_ns for g in groups if g]
        wall = time.monotonic() - start
        return [(a - b) / 1e9 / wall for a, b in zip(after, before, strict=True)]

    def remove_all(self) -> None:
        for cid in self.ids:
            self("delete", "--force", cid, check=False)
        self.ids.clear()


def quota_half(rt: Runner) -> float:
    cid = rt.start(["sh", "-c", f"{BUSY} & {BUSY}"], {"cpu": {"quota": 50_000, "period": 100_000}})
    time.sleep(0.3)
    (used,) = rt.usage([cid], 3.0)
    rt.remove_all()
    return used


def weights_4_to_1(rt: Runner) -> float:
    core = str(max(os.sched_getaffinity(0)))
    heavy = rt.start(["sh", "-c", BUSY], {"cpu": {"shares": 4096, "cpus": core}})
    light = rt.start(["sh", "-c", BUSY], {"cpu": {"shares": 1024, "cpus": core}})
    time.sleep(0.3)
    used_heavy, used_light = rt.usage([heavy, light], 4.0)
    rt.remove_all()
    return used_heavy / max(used_light, 1e-9)


def live_quota_quarter(rt: Runner) -> float:
    cid = rt.start(["sh", "-c", BUSY], {})
    rt("update", "--cpu-quota", "25000", "--cpu-period", "100000", cid)
    time.sleep(0.2)
    (used,) = rt.usage([cid], 1.5)
    rt.remove_all()
    return used


def hook_timeout(rt: Runner) -> float:
    hook = rt.work / "forever.sh"
    hook.write_text("#!/bin/sh\nexec sleep 86400\n")
    hook.chmod(0o755)
    cid = f"{rt.name}-{uuid.uuid4().hex[:8]}"
    rt.ids.append(cid)
    hooks = {"createRuntime": [{"path": str(hook), "timeout": 1}]}
    b = rt.bundle(cid, ["true"], {}, hooks=hooks)
    start = time.perf_counter()
    failed = rt("create", "--bundle", str(b), cid, check=False) != 0
    elapsed = time.perf_counter() - start
    assert failed, f"{rt.name} ran a hook past its timeout"
    rt.remove_all()
    return elapsed


def sigterm_stop(rt: Runner) -> float:
    cid = rt.start(["sh", "-c", 'trap "exit 3" TERM; while :; do sleep 0.1; done'], {})
    time.sleep(0.3)  # the trap is set
    start = time.perf_counter()
    rt("kill", cid, "TERM")
    while rt.status(cid) != "stopped":
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    rt.remove_all()
    return elapsed


@contextlib.contextmanager
def runners(work: Path) -> Iterator[list[Runner]]:
    rootfs = make_bundle(work) / "rootfs"
    for applet in ("sleep",):
        (rootfs / "bin" / applet).symlink_to("busybox")
    parent = f"vz-bench-{uuid.uuid4().hex[:8]}"
    made = [Runner("vz-runtime", VZ_RUNTIME, work, rootfs, parent)]
    runc = shutil.which("runc")
    if runc:
        made.append(Runner("runc", runc, work, rootfs, parent))
    try:
        yield made
    finally:
        for rt in made:
            rt.remove_all()
        _remove_everywhere(parent)


def _remove_everywhere(parent: str) -> None:
    """Remove the run's cgroup parent from every hierarchy: runc makes it in all of them
    (devices, systemd, unified, ...), not only in the controllers vzkit uses."""
    for top in [CG / parent, *CG.glob(f"*/{parent}")]:
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy: its last process is still on its way out
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


ROWS: list[tuple[str, str, Callable[[Runner], float]]] = [
    ("CPU quota 0.5, two busy loops (CPUs)", "target 0.4-0.6", quota_half),
    ("CPU weights 4:1 on one core (ratio)", "target 3-5", weights_4_to_1),
    ("live update to quota 0.25 (CPUs)", "target 0.2-0.3", live_quota_quarter),
    ("createRuntime hook, timeout 1 s (s)", "until create fails", hook_timeout),
    ("SIGTERM to a trapping shell (s)", "until stopped", sigterm_stop),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/runtime_limits.py needs root")
    work = Path(tempfile.mkdtemp(prefix="vz-limits-bench-"))
    try:
        with runners(work) as rts:
            print(f"medians of {args.runs}; " + "  ".join(rt.name for rt in rts))
            for what, note, measure in ROWS:
                values: dict[str, list[float]] = {rt.name: [] for rt in rts}
                for _ in range(args.runs):  # interleaved: load drift hits both alike
                    for rt in rts:
                        values[rt.name].append(measure(rt))
                meds = {name: median(v) for name, v in values.items()}
                line = "  ".join(f"{name} {m:7.3f}" for name, m in meds.items())
                ratio = f"  {meds['vz-runtime'] / meds['runc']:.2f}x runc" if "runc" in meds else ""
                print(f"{what:<40} {line}{ratio}   ({note})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
