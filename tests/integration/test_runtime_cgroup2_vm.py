"""vz-runtime's cgroup v2 code on a real kernel (issue 11: "cgroup v2 is claimed but never
exercised by a real kernel"). This host is a v1/v2 hybrid; the project's 'debian' image
boots systemd, which mounts a v2-only unified hierarchy. The test boots it as a VM (TCG),
pushes vzkit_runtime (standard library only: it needs nothing installed) and a busybox
bundle into it with the SDK's file push, and runs cgroup2_guest.py there: limits written
to the v2 files, the BPF device program, freeze/thaw and the freeze-kill of a fork bomb.

The guest has python3-minimal, which lacks three standard modules the runtime uses: the
extension modules _json and _ctypes, and the ctypes package (for libseccomp).
They are pushed too, from the host's own Debian python3 of the same version (both are
bookworm's 3.11): the test checks the versions match and says so if they do not.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit_runtime
from tests.integration.helpers import compile_static
from vzkit.api.instances import InstanceCreate
from vzkit.sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST_PYTHON = Path("/usr/bin/python3")
STDLIB = Path("/usr/lib/python3.11")
EXTENSIONS = ("_json", "_ctypes")
GUEST = "/opt/vzrt"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "head", "wc", "mknod", "grep", "sleep", "true", "echo", "rm")
BOMB_C = """#include <sys/wait.h>
#include <unistd.h>
int main(void) { for (;;) { fork(); while (waitpid(-1, 0, WNOHANG) > 0); } }
"""
LAUNCHER = f"""import gc
gc.disable()
import sys
sys.path[:0] = ["{GUEST}", "{GUEST}/lib"]
from vzkit_runtime.cli import launch
launch()
"""


def _extension(name: str) -> Path:
    found = sorted((STDLIB / "lib-dynload").glob(f"{name}.cpython-311-*.so"))
    if not found:
        pytest.skip(f"the host's Debian python3 has no {name} extension to lend the guest")
    return found[0]


@pytest.fixture
def guest(client: Client) -> Iterator[str]:
    if not HOST_PYTHON.exists() or not BUSYBOX.exists():
        pytest.skip("needs the host's Debian python3 and busybox-static")
    client.create_instance(
        InstanceCreate.model_validate(
            {"name": "cg2", "image": "debian", "limits": {"memory": "512MiB"}}
        )
    )
    try:
        yield "cg2"
    finally:
        client.delete_instance("cg2", force=True)


def _run(client: Client, name: str, argv: list[str], timeout: float = 120) -> str:
    res, out, err = client.exec_capture(name, argv, timeout=timeout)
    assert res.exit_code == 0, (argv, out.decode(errors="replace"), err.decode(errors="replace"))
    return out.decode()


def _push(client: Client, name: str, path: str, data: bytes, mode: int = 0o644) -> None:
    client.push_file(name, path, io.BytesIO(data), mode=mode, parents=True)


def _push_runtime(client: Client, name: str, bomb: bytes) -> None:
    src = Path(vzkit_runtime.__file__).parent
    for py in sorted(src.glob("*.py")):
        _push(client, name, f"{GUEST}/vzkit_runtime/{py.name}", py.read_bytes())
    _push(client, name, f"{GUEST}/vz-runtime", LAUNCHER.encode())
    for ext in EXTENSIONS:
        so = _extension(ext)
        _push(client, name, f"{GUEST}/lib/{so.name}", so.read_bytes(), 0o755)
    for module in ("__init__.py", "_endian.py"):
        source = (STDLIB / "ctypes" / module).read_bytes()
        _push(client, name, f"{GUEST}/lib/ctypes/{module}", source)
    checks = Path(__file__).with_name("cgroup2_guest.py")
    _push(client, name, f"{GUEST}/cgroup2_guest.py", checks.read_bytes())
    rootfs = f"{GUEST}/bundle/rootfs"
    _push(client, name, f"{rootfs}/bin/busybox", BUSYBOX.read_bytes(), 0o755)
    _push(client, name, f"{rootfs}/bin/bomb", bomb, 0o755)
    links = " ".join(APPLETS)
    script = (
        f"cd {rootfs} && mkdir -p proc dev sys tmp etc && cd bin && "
        f"for a in {links}; do ln -sf busybox $a; done"
    )
    _run(client, name, ["sh", "-c", script])


def test_cgroup_v2_on_a_real_kernel(client: Client, guest: str, tmp_path: Path) -> None:
    fs = _run(client, guest, ["stat", "-fc", "%T", "/sys/fs/cgroup"]).strip()
    assert fs == "cgroup2fs", f"the guest's /sys/fs/cgroup is {fs}, not a v2-only hierarchy"
    # Extension modules are built for one minor version (one ABI) and machine.
    abi = "import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())"
    host_abi = subprocess.run(
        [str(HOST_PYTHON), "-c", abi], capture_output=True, text=True, check=True
    ).stdout
    guest_abi = _run(client, guest, ["python3", "-c", abi])
    if guest_abi != host_abi:
        pytest.skip(f"the guest's python3 ({guest_abi.strip()}) is not the host's ({host_abi})")
    _push_runtime(client, guest, compile_static(tmp_path, "bomb", BOMB_C).read_bytes())

    out = _run(
        client, guest, ["python3", "-I", "-S", f"{GUEST}/cgroup2_guest.py", GUEST], timeout=900
    )
    found = json.loads(out.splitlines()[-1])
    print(f"\ncgroup v2 guest: {found}", file=sys.stderr)
    assert found["version"] == 2
    assert {"cpu", "memory", "pids"} <= set(found["controllers"])
    # Limits in the v2 files, period as given, shares as weight (1024 -> 100).
    assert found["limits"] == {
        "memory.max": str(64 << 20),
        "memory.low": str(16 << 20),
        "cpu.max": "25000 50000",
        "cpu.weight": "200",
        "pids.max": "77",
    }
    assert found["updated"] == {"memory.max": str(32 << 20), "cpu.max": "10000 20000"}
    assert (found["paused"], found["resumed"]) == ("1", "0")
    assert found["limits_removed"]
    # The BPF device program: host devices refused, the default ones open.
    devices = found["devices"]
    for name in ("mknod-kvm", "mknod-loop", "open-loop"):
        assert "Operation not permitted" in devices[name], (name, devices)
    for name in ("null", "zero", "urandom"):
        assert devices[name] == "OK", (name, devices)
    # The fork bomb was at its limit, and nothing was left once kill --all returned.
    assert found["bomb_saturated"] and found["bomb_running"] > 1
    assert found["bomb_left"] == []
    assert found["bomb_unpopulated"] and found["bomb_removed"]
    assert "parent_left" not in found
