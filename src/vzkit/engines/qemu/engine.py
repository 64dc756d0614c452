"""The QEMU engine: runs ``microvm`` and ``vm`` instances and talks to their guest agents.

Per instance it keeps a QMP session (pause/resume/quit and the SHUTDOWN event), a pidfd
(exit notice within milliseconds, even after a daemon restart) and, lazily, one
multiplexed agent connection shared by every exec and file transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shlex
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vzkit.api.host import HostInfo
from vzkit.api.instances import Accel, ExecRequest, Instance, InstanceType, Limits
from vzkit.engines.base import ConsoleStream, ExecSession, ExitInfo, Started
from vzkit.engines.common import CONSOLE_LOG_MAX, ProcessEngine
from vzkit.engines.qemu import disks as layers
from vzkit.engines.qemu import process, savestate
from vzkit.engines.qemu.agent import AgentClient
from vzkit.engines.qemu.cmdline import (
    HOTPLUG_PORTS,
    Disk,
    MachineSpec,
    Nic,
    build_argv,
    hotplug_port,
    kernel_cmdline,
)
from vzkit.errors import AgentError, EngineError, NotFound, ResourceExhausted, StateError
from vzkit.host.cgroups import Cgroup, CgroupDriver, CgroupLimits
from vzkit.host.resources import TCG_TB_SIZE_MIB, qemu_memory_limit
from vzkit.images.store import ImageStore
from vzkit.network import links
from vzkit.network.nics import NetPlan, NicPlan
from vzkit.settings import Settings
from vzkit.storage.manager import VolumeMount

log = logging.getLogger(__name__)
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

BOOT_TIMEOUT = 180.0
_QMP_BUF = 1024 * 1024


@dataclass
class _Live:
    name: str
    uuid: str
    pid: int
    rdir: Path
    qmp: QMPClient | None = None
    events: asyncio.Task[None] | None = None
    agent: AgentClient | None = None
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stop_requested: bool = False
    guest_shutdown: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    cgroup: Cgroup | None = None
    type: InstanceType = InstanceType.MICROVM


class _UnixConsole:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r, self._w = reader, writer

    async def read(self, n: int) -> bytes:
        return await self._r.read(n)

    async def write(self, data: bytes) -> None:
        self._w.write(data)
        await self._w.drain()

    async def close(self) -> None:
        self._w.close()
        with contextlib.suppress(OSError):
            await self._w.wait_closed()


class QemuEngine(ProcessEngine):
    def __init__(
        self,
        settings: Settings,
        host: HostInfo,
        images: ImageStore,
        cgroups: CgroupDriver | None,
    ) -> None:
        super().__init__(settings)
        self.host = host
        self.images = images
        self.cgroups = cgroups
        self._live: dict[str, _Live] = {}
        self.user = _qemu_user(settings.qemu_user, (settings.state_dir, settings.runtime_dir))

    def runtime_dir(self, uuid: str) -> Path:
        return self.settings.instance_runtime_dir / uuid

    # -- lifecycle ---------------------------------------------------------------------

    async def create(self, inst: Instance, uuid: str) -> dict[str, Any]:
        image = self.images.get(inst.image)
        sdir = self.state_dir(uuid)
        sdir.mkdir(parents=True, exist_ok=True)
        rootfs = image.files.get("rootfs")
        if rootfs:
            # The instance holds its own link to the image's disk, so rebuilding or
            # deleting the image never pulls the backing file from under it.
            base = sdir / "base.qcow2"
            try:
                os.link(rootfs, base)
            except OSError:
                await asyncio.to_thread(shutil.copyfile, rootfs, base)
            # A copy-on-write overlay: instant whatever the image size.
            await _run(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                base.name,
                str(sdir / "root.qcow2"),
            )
        return {}

    async def start(
        self,
        inst: Instance,
        uuid: str,
        runtime: dict[str, Any],
        net: NetPlan,
        restore: Path | None = None,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        if inst.name in self._live:
            raise EngineError(f"instance {inst.name!r} already has a running QEMU")
        t0 = time.monotonic()
        image = self.images.get(inst.image)
        self.images.check(image)
        sdir, rdir = self.state_dir(uuid), self.runtime_dir(uuid)
        sdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True, mode=0o700)
        accel = inst.accel or Accel(self.host.accel)
        disks: tuple[Disk, ...] = ()
        root = None
        extra_args = image.files.get("cmdline", "")
        if image.files.get("rootfs"):
            disks = (Disk(sdir / layers.top_name(runtime)),)
            # The root disk is the first virtio-blk device; the image may name it itself.
            root = None if "vz.root=" in extra_args else "/dev/vda"
        disks += tuple(
            Disk(v.host_path, node=v.device_id, read_only=v.readonly, serial=v.name[:20])
            for v in volumes
        )
        cgroup: Cgroup | None = None
        pid: int | None = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.create(
                    self.settings.instance_cgroup(inst.name),
                    self._cgroup_limits(inst, inst.limits),
                )
            for nic in net.nics:
                await asyncio.to_thread(_ensure_tap, nic, self.user[0] if self.user else None)
            socks = [
                process.listen_unix(rdir / n) for n in ("qmp.sock", "agent.sock", "console.sock")
            ]
            state_fd = os.open(restore, os.O_RDONLY) if restore else None
            jail = self._jail(sdir, rdir, volumes) if self.settings.jail else None
            with process.closing_all(socks), _closing_fd(state_fd):
                spec = MachineSpec(
                    name=inst.name,
                    uuid=uuid,
                    type=inst.type,
                    cpus=inst.limits.cpus,
                    memory=inst.limits.memory,
                    accel=accel,
                    kernel=Path(image.files["kernel"]),
                    initrd=Path(image.files["initrd"]),
                    cmdline=kernel_cmdline(
                        hostname=inst.name,
                        tsc_khz=self.host.tsc_khz,
                        root=root,
                        extra=extra_args,
                    ),
                    qmp_fd=socks[0].fileno(),
                    agent_fd=socks[1].fileno(),
                    console_fd=socks[2].fileno(),
                    console_log=sdir / "console.log",
                    pid_file=rdir / "qemu.pid",
                    disks=disks,
                    nics=tuple(Nic(n.host_name, n.mac) for n in net.nics),
                    extra=tuple(savestate.incoming_args(state_fd) if state_fd else ()),
                )
                # A fresh boot starts a fresh console log.
                (sdir / "console.log").write_bytes(b"")
                self._give(rdir, sdir / "console.log", *(d.path for d in disks if not d.read_only))
                t_spawn = time.monotonic()
                pid = await process.launch(
                    build_argv(self.settings.qemu_binary, spec),
                    pass_fds=[s.fileno() for s in socks] + ([state_fd] if state_fd else []),
                    procs_files=cgroup.procs_files() if cgroup else [],
                    pid_file=spec.pid_file,
                    log_file=sdir / "qemu.log",
                    jail=jail,
                )
            t_launched = time.monotonic()
            live = _Live(inst.name, uuid, pid, rdir, cgroup=cgroup, type=inst.type)
            self._live[inst.name] = live
            try:
                await self._watch(live)
            except Exception as exc:
                if not process.is_our_qemu(pid, uuid):
                    raise self._boot_failure(live) from exc
                raise EngineError(f"cannot connect to QEMU's monitor: {exc}") from exc
            t_watched = time.monotonic()
            if restore is not None:
                assert live.qmp is not None
                await savestate.wait_loaded(live.qmp)
                await live.qmp.execute("cont")
            agent = await self._wait_agent(live, BOOT_TIMEOUT)
            if net.nics or restore:
                # After a restore the guest may be another instance's memory: rename it too.
                await _configure_guest(agent, net.guest_script(inst.name if restore else None))
            if volumes:
                await _configure_guest(
                    agent, _disk_links([v.name[:20] for v in volumes]), "disks", "see the console"
                )
            log.info(
                "%s started: set-up %.3fs, qemu launch %.3fs, qmp %.3fs, boot to agent %.3fs",
                inst.name,
                t_spawn - t0,
                t_launched - t_spawn,
                t_watched - t_launched,
                time.monotonic() - t_watched,
            )
            return Started(
                pid=pid,
                agent_version=agent.hello.agent_version,
                kernel_release=agent.hello.kernel_release,
            )
        except BaseException:
            live_ = self._live.pop(inst.name, None)
            if live_ is not None:
                await self._detach(live_)
            if pid is not None:
                process.kill(pid)
                await asyncio.to_thread(process.wait_gone, pid, 5.0)
            if cgroup is not None:
                await asyncio.to_thread(cgroup.destroy)
            shutil.rmtree(rdir, ignore_errors=True)
            raise

    def _jail(self, sdir: Path, rdir: Path, volumes: Sequence[VolumeMount]) -> process.Jail:
        """QEMU sees the images, its own instance directories and its own volumes; the
        rest of vzkit's state (other instances' disks and sockets, the database) is
        covered."""
        s = self.settings
        keep = [(s.images_dir, True), (sdir, False), (rdir, False)]
        keep += [(v.host_path, v.readonly) for v in volumes]
        return process.Jail(hide=(s.state_dir, s.runtime_dir), keep=tuple(keep), user=self.user)

    def _give(self, *paths: Path) -> None:
        """Hand files QEMU writes to its user (created by vzd, as root)."""
        if self.user is not None:
            for path in paths:
                os.chown(path, *self.user)

    async def attach(self, inst: Instance, uuid: str, runtime: dict[str, Any]) -> str | None:
        pid = inst.pid
        if pid is None:
            # vzd died during the boot, before it recorded the pid: QEMU's pid file has it.
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.runtime_dir(uuid) / "qemu.pid").read_text().strip())
        if pid is None or not process.is_our_qemu(pid, uuid):
            if self.cgroups is not None:
                cg = self.cgroups.open(self.settings.instance_cgroup(inst.name))
                if cg is not None:
                    # Whatever is left in it is ours and unwanted (a launcher shell).
                    await asyncio.to_thread(cg.kill)
                    await asyncio.to_thread(cg.destroy, timeout=5.0)
            shutil.rmtree(self.runtime_dir(uuid), ignore_errors=True)
            return None
        cgroup = None
        if self.cgroups is not None:
            cgroup = self.cgroups.open(self.settings.instance_cgroup(inst.name))
        live = _Live(inst.name, uuid, pid, self.runtime_dir(uuid), cgroup=cgroup, type=inst.type)
        self._live[inst.name] = live
        try:
            await self._watch(live)
            assert live.qmp is not None
            # A snapshot the previous vzd was taking may still be saving memory: stop it.
            migration: Any = await live.qmp.execute("query-migrate")
            if migration.get("status") in ("setup", "active", "pre-switchover", "device"):
                await live.qmp.execute("migrate_cancel")
            status: Any = await live.qmp.execute("query-status")
        except Exception as exc:
            log.warning("cannot re-attach to %s (pid %d): %s", inst.name, pid, exc)
            self._live.pop(inst.name, None)
            await self._detach(live)
            return None
        paused = {"paused", "suspended", "postmigrate", "finish-migrate"}
        return "paused" if status.get("status") in paused else "running"

    async def stop(self, name: str, *, force: bool, timeout: float) -> None:
        live = self._get(name)
        live.stop_requested = True
        if not force:
            try:
                agent = await self._agent(live, timeout=min(timeout, 5.0))
                await asyncio.wait_for(agent.poweroff(), timeout)
            except (AgentError, TimeoutError, OSError) as exc:
                log.info("agent power-off of %s failed (%s); trying ACPI", name, exc)
                with contextlib.suppress(Exception):
                    assert live.qmp is not None
                    await live.qmp.execute("system_powerdown")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.exited.wait(), timeout)
                return
            log.info("%s did not power off within %.0fs: killing it", name, timeout)
        await self._kill(live)

    async def _kill(self, live: _Live) -> None:
        live.stop_requested = True
        if live.qmp is not None:
            # quit lets QEMU close its disk images cleanly; SIGKILL is the fallback.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(live.qmp.execute("quit"), 2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.exited.wait(), 3.0)
            return
        process.kill(live.pid)
        await live.exited.wait()

    async def update(self, inst: Instance, limits: Limits) -> None:
        if (limits.cpus, limits.memory) != (inst.limits.cpus, inst.limits.memory):
            raise StateError(
                f"cannot change the vCPUs or memory of {inst.name!r} while it runs",
                hint=f"stop it, change the limits, start it: vz stop {inst.name}",
            )
        live = self._get(inst.name)
        if live.cgroup is not None:
            await asyncio.to_thread(live.cgroup.update, self._cgroup_limits(inst, limits))

    def _cgroup_limits(self, inst: Instance, limits: Limits) -> CgroupLimits:
        accel = inst.accel or Accel(self.host.accel)
        return CgroupLimits(
            memory_max=qemu_memory_limit(
                limits.memory,
                cpus=limits.cpus,
                tb_size_mib=TCG_TB_SIZE_MIB if accel is Accel.TCG else 0,
            ),
            cpu_weight=limits.cpu_weight,
            cpuset_cpus=limits.cpu_pin,
        )

    # -- snapshots and copies -------------------------------------------------------------

    async def snapshot_disk(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], dest: Path
    ) -> tuple[dict[str, Any], str | None]:
        """Freeze the disk's top as the snapshot's layer (a running VM must be paused)."""
        sdir = self.state_dir(uuid)
        if not (sdir / layers.top_name(runtime)).is_file():
            return runtime, None  # a micro-VM booted from its initramfs has no disk
        top = layers.top_name(runtime)
        live = self._live.get(inst.name)
        if live is not None and live.qmp is not None:
            new = await layers.freeze_live(live.qmp, sdir, top, self.user)
        else:
            new = await layers.freeze_offline(sdir, top)
        return {**runtime, "top": new}, top

    async def quiesce(self, name: str) -> None:
        """Make the memory cheap to save: migration sends a zero page as one flag, but the
        pages a booted kernel has freed still hold their old bytes (~70 MB of a 256 MiB
        micro-VM). The guest drops its caches and writes zeros over its free memory."""
        agent = await self._agent(self._get(name))
        with contextlib.suppress(AgentError):
            await agent.run(["/bin/sh", "-c", _ZERO_FREE_MEMORY], timeout=60)

    async def save_state(self, name: str, dest: Path) -> int:
        live = self._get(name)
        assert live.qmp is not None
        return await savestate.save(live.qmp, dest)

    async def restore_disk(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], snapshot: Path, layer: str | None
    ) -> dict[str, Any]:
        if layer is None:
            return runtime
        new = await layers.new_top_over(self.state_dir(uuid), layer)
        return {**runtime, "top": new}

    async def clone_disk(
        self,
        src_uuid: str,
        layer: str | None,
        dst_uuid: str,
    ) -> dict[str, Any]:
        """A new instance directory whose disk is a fresh top over ``layer`` (frozen)."""
        dst = self.state_dir(dst_uuid)
        dst.mkdir(parents=True, exist_ok=True)
        if layer is None:
            return {}
        src = self.state_dir(src_uuid)
        names = await asyncio.to_thread(layers.chain, src, layer)
        await asyncio.to_thread(layers.link_chain, src, dst, names)
        return {"top": await layers.freeze_offline(dst, layer)}

    async def prune_disks(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], keep: list[str]
    ) -> None:
        sdir = self.state_dir(uuid)
        await asyncio.to_thread(layers.prune, sdir, [layers.top_name(runtime), *keep])

    async def drop_layer(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], layer: str
    ) -> None:
        """Make a deleted snapshot's layer unneeded by merging it into its children."""
        running = layers.top_name(runtime) if inst.name in self._live else None
        await asyncio.to_thread(layers.merge_out, self.state_dir(uuid), layer, running)

    async def io_stats(self, name: str) -> tuple[int, int] | None:
        """Bytes read and written by the guest, over all its disks."""
        live = self._live.get(name)
        if live is None or live.qmp is None:
            return None
        devices: Any = await live.qmp.execute("query-blockstats")
        read = sum(int(d.get("stats", {}).get("rd_bytes", 0)) for d in devices)
        written = sum(int(d.get("stats", {}).get("wr_bytes", 0)) for d in devices)
        return read, written

    # -- volumes ---------------------------------------------------------------------------

    def _hotplug(self, name: str, verb: str) -> QMPClient:
        live = self._get(name)
        if live.type is not InstanceType.VM or live.qmp is None:
            raise StateError(
                f"cannot {verb} a volume while micro-VM {name!r} runs (virtio-mmio has no "
                "hot-plug)",
                hint=f"stop it first (vz stop {name}); the change applies at the next start",
            )
        return live.qmp

    async def attach_volume(self, name: str, volume: VolumeMount) -> None:
        qmp = self._hotplug(name, "attach")
        node = volume.device_id
        try:
            # By descriptor: the jailed QEMU cannot see the pool.
            fd = os.open(volume.host_path, os.O_RDONLY if volume.readonly else os.O_RDWR)
            try:
                qmp.send_fd_scm(fd)
                added: Any = await qmp.execute("add-fd", {"opaque": node})
            finally:
                os.close(fd)
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "read-only": volume.readonly,
                    "file": {"driver": "file", "filename": f"/dev/fdset/{added['fdset-id']}"},
                },
            )
        except Exception as exc:
            raise EngineError(f"QEMU cannot open volume {volume.name!r}: {exc}") from exc
        device = {
            "driver": "virtio-blk-pci",
            "id": node,
            "drive": node,
            "serial": volume.name[:20],
        }
        errors = []
        # The first free spare port; a taken one refuses the device.
        for port in range(HOTPLUG_PORTS + 16):
            try:
                await qmp.execute("device_add", {**device, "bus": hotplug_port(port)})
            except Exception as exc:
                errors.append(str(exc))
                if "not found" in str(exc):
                    break
                continue
            # Without udev (the minimal image) nothing loads the driver of a device that
            # was not there at boot; the script does, and waits for the disk to appear.
            agent = await self._agent(self._get(name))
            try:
                await _configure_guest(
                    agent,
                    _disk_links([volume.name[:20]]),
                    "disks",
                    "the guest did not see the hot-plugged disk (here a q35 VM takes one "
                    f"live-attached volume); stop {name}, attach it, start it again",
                )
            except BaseException:
                # The guest never saw it: take it out again, nothing half-attached stays.
                with contextlib.suppress(Exception):
                    await qmp.execute("device_del", {"id": node})
                with contextlib.suppress(Exception):
                    await asyncio.sleep(0.5)
                    await qmp.execute("blockdev-del", {"node-name": node})
                raise
            return
        with contextlib.suppress(Exception):
            await qmp.execute("blockdev-del", {"node-name": node})
        raise ResourceExhausted(
            f"no free hot-plug slot for volume {volume.name!r} in {name!r}: {errors[-1]}",
            hint="detach another volume, or stop the VM and attach it (it then gets its own)",
        )

    async def detach_volume(self, name: str, volume: VolumeMount) -> None:
        qmp = self._hotplug(name, "detach")
        node = volume.device_id
        try:
            await qmp.execute("device_del", {"id": node})
        except Exception as exc:
            raise EngineError(f"cannot unplug volume {volume.name!r}: {exc}") from exc
        # The guest releases the device (PCIe hot-plug has the guest acknowledge; Linux
        # waits 5 s for a cancel first), then QEMU removes it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            devices: Any = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
            if not any(d.get("name") == node for d in devices):
                break
            await asyncio.sleep(0.1)
        else:
            raise EngineError(
                f"the guest of {name!r} did not release volume {volume.name!r} within 30 s",
                hint="it may still be in use inside the guest: unmount it there, then retry",
            )
        for n in (node, f"{node}-file"):
            with contextlib.suppress(Exception):
                await qmp.execute("blockdev-del", {"node-name": n})
        with contextlib.suppress(Exception):
            fdsets: Any = await qmp.execute("query-fdsets")
            for fdset in fdsets:
                if any(f.get("opaque") == node for f in fdset.get("fds", [])):
                    await qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})

    async def resize_volume(self, name: str, volume: VolumeMount, size: int) -> None:
        live = self._get(name)
        assert live.qmp is not None
        try:
            await live.qmp.execute("block_resize", {"node-name": volume.device_id, "size": size})
        except Exception as exc:
            raise EngineError(f"resizing volume {volume.name!r} failed: {exc}") from exc

    async def plug(self, name: str, nic: NicPlan) -> None:
        raise StateError(
            f"cannot add a network interface to {name!r} while it runs",
            hint=f"stop it first (vz stop {name}); the interface is added at the next start",
        )

    async def unplug(self, name: str, nic: NicPlan) -> None:
        raise StateError(
            f"cannot remove a network interface from {name!r} while it runs",
            hint=f"stop it first: vz stop {name}",
        )

    async def pause(self, name: str) -> None:
        await self._qmp(name, "stop")

    async def resume(self, name: str) -> None:
        await self._qmp(name, "cont")

    async def _qmp(self, name: str, cmd: str) -> Any:
        live = self._get(name)
        if live.qmp is None:
            raise EngineError(f"no QMP connection to {name!r}")
        try:
            return await live.qmp.execute(cmd)
        except Exception as exc:
            raise EngineError(f"QMP {cmd} failed for {name!r}: {exc}") from exc

    async def exec(self, name: str, req: ExecRequest) -> ExecSession:
        agent = await self._agent(self._get(name))
        env = dict(req.env)
        if env:
            env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            env.setdefault("HOME", "/root")
            if req.tty:
                env.setdefault("TERM", "xterm-256color")
        return await agent.exec(
            req.argv,
            env=env or None,
            cwd=req.cwd,
            tty=req.tty,
            rows=req.rows,
            cols=req.cols,
            stdin=req.stdin,
            timeout=req.timeout,
        )

    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None:
        agent = await self._agent(self._get(name))
        await agent.push_file(path, data, mode=mode, parents=parents)

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        agent = await self._agent(self._get(name))
        return await agent.pull_file(path)

    async def open_console(self, name: str) -> ConsoleStream:
        live = self._get(name)
        reader, writer = await asyncio.open_unix_connection(str(live.rdir / "console.sock"))
        return _UnixConsole(reader, writer)

    def trim_console_logs(self) -> None:
        """Keep each console log bounded; QEMU appends (O_APPEND), so truncating is safe."""
        for live in self._live.values():
            path = self.state_dir(live.uuid) / "console.log"
            with contextlib.suppress(OSError):
                if path.stat().st_size > CONSOLE_LOG_MAX:
                    with open(path, "r+b") as f:
                        f.seek(-CONSOLE_LOG_MAX // 2, os.SEEK_END)
                        tail = f.read()
                        f.seek(0)
                        f.truncate()
                        f.write(tail)

    async def destroy(self, inst: Instance, uuid: str) -> None:
        if inst.name in self._live:
            await self._kill(self._live[inst.name])
        shutil.rmtree(self.runtime_dir(uuid), ignore_errors=True)
        shutil.rmtree(self.state_dir(uuid), ignore_errors=True)

    async def close(self) -> None:
        for live in list(self._live.values()):
            await self._detach(live)
        self._live.clear()

    def allocated_pids(self) -> dict[str, int]:
        return {name: live.pid for name, live in self._live.items()}

    # -- internals ---------------------------------------------------------------------

    def _get(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            raise NotFound(
                f"instance {name!r} has no running QEMU", hint=f"start it first: vz start {name}"
            )
        return live

    async def _watch(self, live: _Live) -> None:
        """Connect QMP and watch the pid, so an exit is noticed at once."""
        self.watch_exit(live.pid, lambda: self._handle_exit(live))
        qmp = QMPClient(live.name, readbuflen=_QMP_BUF)
        await qmp.connect(str(live.rdir / "qmp.sock"))
        live.qmp = qmp
        listener = EventListener(("SHUTDOWN",))
        qmp.register_listener(listener)
        live.events = asyncio.create_task(self._events(live, listener))

    async def _events(self, live: _Live, listener: EventListener) -> None:
        async for event in listener:
            data = event.get("data")
            if isinstance(data, dict) and data.get("guest"):
                live.guest_shutdown = True

    async def _handle_exit(self, live: _Live) -> None:
        if self._live.get(live.name) is live:
            del self._live[live.name]
        await self._detach(live)
        if live.cgroup is not None:
            await asyncio.to_thread(live.cgroup.destroy)
        shutil.rmtree(live.rdir, ignore_errors=True)
        live.exited.set()
        if live.stop_requested:
            info = ExitInfo(live.pid, True, "stopped")
        elif live.guest_shutdown:
            info = ExitInfo(live.pid, True, "the guest powered off")
        else:
            tail = self.console_log(live.name, live.uuid)[-300:].decode(errors="replace")
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            info = ExitInfo(
                live.pid,
                False,
                f"QEMU (pid {live.pid}) exited without a guest shutdown (killed or crashed)"
                + (f"; last console line: {last}" if last else ""),
            )
        await self.report_exit(live.name, info)

    async def _detach(self, live: _Live) -> None:
        """Drop our connections to an instance (it may keep running)."""
        self.unwatch_exit(live.pid)
        if live.events is not None:
            live.events.cancel()
        if live.agent is not None:
            with contextlib.suppress(Exception):
                await live.agent.close()
        if live.qmp is not None:
            with contextlib.suppress(Exception):
                await live.qmp.disconnect()

    async def _agent(self, live: _Live, timeout: float = 10.0) -> AgentClient:
        async with live.agent_lock:
            if live.agent is not None and not live.agent.closed:
                return live.agent
            live.agent = await AgentClient.connect_unix(live.rdir / "agent.sock", timeout=timeout)
            return live.agent

    async def _wait_agent(self, live: _Live, timeout: float) -> AgentClient:
        """Wait for the guest agent's hello, failing fast if QEMU dies meanwhile."""
        connect = asyncio.create_task(self._agent(live, timeout))
        died = asyncio.create_task(live.exited.wait())
        done, _ = await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        if connect in done:
            try:
                return connect.result()
            except AgentError as exc:
                # The socket broke because QEMU died: say that, not "connection reset".
                if await asyncio.to_thread(process.wait_gone, live.pid, 1.0):
                    raise self._boot_failure(live) from exc
                raise
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        raise self._boot_failure(live)

    def _boot_failure(self, live: _Live) -> EngineError:
        tail = self.console_log(live.name, live.uuid)[-2000:].decode(errors="replace")
        return EngineError(
            f"QEMU exited while {live.name!r} was booting",
            hint="the guest console said:\n" + tail if tail.strip() else "see vzd's log",
        )


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise EngineError(f"{argv[0]} failed: {(err or out).decode(errors='replace').strip()}")


def kill_signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _disk_links(serials: list[str]) -> str:
    """Wait for the disks with these serials and link /dev/disk/by-id/virtio-SERIAL to them,
    as udev does where there is one (so the path is the same in every image)."""
    wanted = " ".join(shlex.quote(s) for s in serials)
    return f"""
modprobe virtio_blk 2>/dev/null
mkdir -p /dev/disk/by-id
for want in {wanted}; do
  found=
  for i in $(seq 100); do
    for f in /sys/block/*/serial; do
      [ "$(cat "$f" 2>/dev/null)" = "$want" ] && found=${{f%/serial}} && break 2
    done
    sleep 0.1
  done
  [ -n "$found" ] || {{ echo "disk $want did not appear" >&2; exit 1; }}
  ln -sf "../../${{found##*/}}" "/dev/disk/by-id/virtio-$want"
done
"""


# A tmpfs file of zeros as large as free memory allows (keeping 24 MiB spare so nothing
# else in the guest runs short), then removed: the freed pages hold zeros.
_ZERO_FREE_MEMORY = """
sync; echo 3 > /proc/sys/vm/drop_caches
d=$(mktemp -d) && mount -t tmpfs -o size=100% vz-zero "$d" || exit 0
free=$(awk '/^MemAvailable:/ {print int($2 / 1024) - 24}' /proc/meminfo)
[ "$free" -gt 0 ] && dd if=/dev/zero of="$d/zero" bs=1M count="$free" 2>/dev/null
umount "$d"; rmdir "$d"
"""


def _ensure_tap(nic: NicPlan, owner: int | None = None) -> None:
    links.ensure_tap(
        nic.host_name,
        bridge=nic.bridge,
        network=nic.network,
        instance=nic.instance,
        daemon=nic.daemon,
        owner=owner,
    )


def _qemu_user(name: str, dirs: tuple[Path, ...]) -> tuple[int, int] | None:
    """The (uid, gid) QEMU runs as, or None (root) when that cannot work, with the reason
    in the log: no such user, or vzkit's directories under one it cannot enter."""
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        log.warning("user %s does not exist: QEMU runs as root (run scripts/setup)", name)
        return None
    for d in dirs:
        for parent in d.absolute().parents:
            mode = parent.stat().st_mode if parent.exists() else 0o755
            if not mode & 0o001:
                log.warning(
                    "%s cannot enter %s (mode %o): QEMU runs as root", name, parent, mode & 0o777
                )
                return None
    return entry.pw_uid, entry.pw_gid


async def _configure_guest(
    agent: AgentClient,
    script: str,
    what: str = "network",
    hint: str = "the image needs a POSIX sh and the ip command (busybox or iproute2)",
) -> None:
    """Run a set-up script in the guest through its agent (NIC addresses: no DHCP round
    trip on the boot path; disks: driver and /dev/disk/by-id links)."""
    done = await agent.run(["/bin/sh", "-c", script], timeout=30)
    if done.result.exit_code != 0:
        why = (done.stderr or done.stdout).decode(errors="replace").strip()[-500:]
        raise EngineError(f"configuring the guest's {what} failed: {why or done.result}", hint=hint)


@contextlib.contextmanager
def _closing_fd(fd: int | None) -> Iterator[None]:
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
