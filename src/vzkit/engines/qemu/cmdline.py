"""QEMU command lines built from typed machine descriptions.

Nothing outside this module assembles QEMU arguments; callers describe the machine and get
an argv back. Sockets are passed as inherited file descriptors (``fd=N``), created by the
caller before QEMU starts, so nothing waits for a path to appear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vzkit.api.instances import Accel, InstanceType
from vzkit.guest.protocol import AGENT_PORT_NAME
from vzkit.host.resources import TCG_TB_SIZE_MIB


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str = "qcow2"
    node: str = "root"
    read_only: bool = False
    # Volumes: the guest finds them as /dev/disk/by-id/virtio-<serial>.
    serial: str | None = None
    # An inherited descriptor QEMU opens the disk through (an fd set; ``path`` unused):
    # a jailed QEMU cannot see volume pools.
    fd: int | None = None


# Spare PCIe root ports of a q35 VM, for volumes and NICs plugged in while it runs (the
# root bus itself takes no hot-plug). Each boot-time volume gets a port of its own too, so
# that it can be unplugged live.
HOTPLUG_PORTS = 4


def hotplug_port(i: int) -> str:
    return f"hp{i}"


@dataclass(frozen=True)
class Nic:
    """A virtio-net device on a TAP the daemon made (QEMU opens it by name)."""

    tap: str
    mac: str


@dataclass(frozen=True)
class MachineSpec:
    """Everything QEMU needs to know about one instance's machine."""

    name: str
    uuid: str
    type: InstanceType
    cpus: int
    memory: int
    accel: Accel
    kernel: Path
    initrd: Path
    cmdline: str
    qmp_fd: int
    agent_fd: int
    console_fd: int
    console_log: Path
    pid_file: Path
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    # QEMU's own seccomp filter. spawn and elevateprivileges stay allowed: -daemonize forks
    # and calls setsid after the filter is in place.
    sandbox: bool = True
    # Bounds TCG's translation cache, which otherwise grows to 1 GiB of host memory.
    tcg_tb_size_mib: int = TCG_TB_SIZE_MIB
    extra: tuple[str, ...] = field(default=())


def _bus(spec: MachineSpec) -> str:
    return "device" if spec.type is InstanceType.MICROVM else "pci"


def machine_args(spec: MachineSpec) -> list[str]:
    if spec.type is InstanceType.MICROVM:
        machine = "microvm"
    elif spec.type is InstanceType.VM:
        machine = "q35"
    else:
        raise ValueError(f"QEMU cannot run instances of type {spec.type}")
    if spec.accel is Accel.KVM:
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", f"tcg,tb-size={spec.tcg_tb_size_mib}", "-cpu", "max"]
    return ["-machine", machine, *accel]


def build_argv(binary: str, spec: MachineSpec) -> list[str]:
    bus = _bus(spec)
    argv = [
        binary,
        # The uuid in the command line lets the daemon recognise its QEMU after a restart.
        "-name",
        f"vz-{spec.name},debug-threads=on",
        "-uuid",
        spec.uuid,
        *machine_args(spec),
        "-smp",
        str(spec.cpus),
        "-m",
        f"{spec.memory // (1024 * 1024)}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        spec.cmdline,
        "-chardev",
        f"socket,id=qmp,fd={spec.qmp_fd},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=con0,fd={spec.console_fd},server=on,wait=off,"
        f"logfile={spec.console_log},logappend=on",
        "-serial",
        "chardev:con0",
        "-device",
        f"virtio-serial-{bus},max_ports=2",
        "-chardev",
        f"socket,id=agent,fd={spec.agent_fd},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]
    volumes = [d for d in spec.disks if d.serial is not None]
    if spec.type is InstanceType.VM:
        for i in range(len(volumes) + HOTPLUG_PORTS):
            argv += ["-device", f"pcie-root-port,id={hotplug_port(i)},chassis={i + 1}"]
    for fdset, disk in enumerate(spec.disks, start=1):
        ro = ",read-only=on" if disk.read_only else ""
        filename = str(disk.path)
        if disk.fd is not None:
            # opaque: hot-unplug finds the set by it and removes it (hotplug.py).
            argv += ["-add-fd", f"fd={disk.fd},set={fdset},opaque={disk.node}"]
            filename = f"/dev/fdset/{fdset}"
        device = f"virtio-blk-{bus},drive={disk.node}"
        if disk.serial is not None:
            device += f",id={disk.node},serial={disk.serial}"
            if spec.type is InstanceType.VM:
                device += f",bus={hotplug_port(volumes.index(disk))}"
        argv += [
            "-blockdev",
            f"driver=file,filename={filename},node-name={disk.node}-file,cache.direct=off{ro}",
            "-blockdev",
            f"driver={disk.format},file={disk.node}-file,node-name={disk.node}{ro}",
            "-device",
            device,
        ]
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev",
            f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-{bus},netdev=net{i},mac={nic.mac}",
        ]
    if spec.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]
    argv += ["-daemonize", "-pidfile", str(spec.pid_file), *spec.extra]
    return argv


def kernel_cmdline(
    *, hostname: str, tsc_khz: int | None, root: str | None = None, extra: str = ""
) -> str:
    # net.ifnames=0: interfaces stay ethN in systemd guests too, as vzkit names them.
    parts = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "rdinit=/init",
        f"vz.hostname={hostname}",
        "net.ifnames=0",
    ]
    if tsc_khz:
        # Without it, TCG guests booting side by side hang calibrating the TSC against the PIT.
        parts += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
    if root:
        parts.append(f"vz.root={root}")
    if root or "vz.root=" in extra:
        # systemd on the root disk takes its hostname from here, not from the initramfs.
        parts.append(f"systemd.hostname={hostname}")
    if extra:
        parts.append(extra)
    return " ".join(parts)
