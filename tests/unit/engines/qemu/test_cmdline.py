"""Golden command lines: ``build_argv`` for a few representative machines, argument by
argument. A change to QEMU's command line shows here as a diff to review; regenerate the
files with ``VZ_GOLDEN_UPDATE=1`` and read the diff before committing it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzkit.api.instances import Accel, InstanceType
from vzkit.engines.qemu import savestate
from vzkit.engines.qemu.cmdline import Disk, MachineSpec, Nic, build_argv, kernel_cmdline

GOLDEN = Path(__file__).parent / "golden"
UUID = "0b7ad4f8-5a0e-4b61-9a55-5d2c1f3e8a11"
STATE = Path("/var/lib/vzkit/instances") / UUID
RUN = Path("/run/vzkit/instances") / UUID


def _spec(name: str, kind: InstanceType, **kw: object) -> MachineSpec:
    base: dict[str, object] = {
        "name": name,
        "uuid": UUID,
        "type": kind,
        "cpus": 1,
        "memory": 256 << 20,
        "accel": Accel.TCG,
        "kernel": Path("/var/lib/vzkit/images/blobs/sha256-kernel"),
        "initrd": Path("/var/lib/vzkit/images/blobs/sha256-initrd"),
        "cmdline": kernel_cmdline(hostname=name, tsc_khz=2300000),
        "qmp_fd": 10,
        "agent_fd": 11,
        "console_fd": 12,
        "console_log": STATE / "console.log",
        "pid_file": RUN / "qemu.pid",
    }
    return MachineSpec(**{**base, **kw})  # type: ignore[arg-type]


SPECS = {
    # A micro-VM booting its initramfs: no disk, no NIC.
    "microvm": _spec("tiny", InstanceType.MICROVM),
    # A q35 VM with its root disk, two volumes (one read-only, both as inherited
    # descriptors) and two NICs, on KVM.
    "q35-volumes-nics": _spec(
        "web",
        InstanceType.VM,
        cpus=2,
        memory=1 << 30,
        accel=Accel.KVM,
        cmdline=kernel_cmdline(hostname="web", tsc_khz=None, root="/dev/vda"),
        disks=(
            Disk(STATE / "disk-0a1b2c3d4e5f.qcow2"),
            Disk(Path("/srv/pool/data.qcow2"), node="vol-default-data", serial="data", fd=14),
            Disk(
                Path("/srv/pool/ro.qcow2"),
                node="vol-default-ro",
                read_only=True,
                serial="ro",
                fd=15,
            ),
        ),
        nics=(Nic("vzt1a2b3c4d0", "52:54:00:12:34:56"), Nic("vzt1a2b3c4d1", "52:54:00:12:34:57")),
    ),
    # A micro-VM restored from a stateful snapshot (memory from an inherited descriptor),
    # with a disk and a NIC.
    "microvm-restore": _spec(
        "tick",
        InstanceType.MICROVM,
        disks=(Disk(STATE / "root.qcow2"),),
        nics=(Nic("vzt9f8e7d6c0", "52:54:00:aa:bb:cc"),),
        extra=tuple(savestate.incoming_args(13)),
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_build_argv_matches_its_golden_file(name: str) -> None:
    argv = build_argv("qemu-system-x86_64", SPECS[name])
    path = GOLDEN / f"{name}.argv"
    text = "\n".join(argv) + "\n"
    if os.environ.get("VZ_GOLDEN_UPDATE"):
        path.write_text(text)
    assert text == path.read_text()


def test_only_qemu_types_have_a_machine() -> None:
    with pytest.raises(ValueError, match="cannot run instances of type container"):
        build_argv("qemu", _spec("c", InstanceType.CONTAINER))
