"""The QEMU engine: runs ``microvm`` and ``vm`` instances and talks to their guest agents.

Per instance it keeps a QMP session (pause/resume/quit and the SHUTDOWN event), a pidfd
(exit notice within milliseconds, even after a daemon restart) and, lazily, one
multiplexed agent connection shared by every exec and file transfer. Its capabilities
live beside it: disk layers and publishing (``layers``), export and import (``transfer``),
volume hot-plug (``hotplug``); memory snapshots are part of the engine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pwd
import shutil
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vzkit.api.host import HostInfo
from vzkit.api.instances import Accel, ExecRequest, ImageInfo, Instance, InstanceType, Limits
from vzkit.engines.base import (
    Capabilities,
    ConsoleStream,
    EngineState,
    ExecSession,
    ExitInfo,
    Refusal,
    Started,
)
from vzkit.engines.common import CONSOLE_LOG_MAX, ProcessEngine
from vzkit.engines.qemu import guest, process, savestate
from vzkit.engines.qemu.agent import AgentClient
from vzkit.engines.qemu.cmdline import Disk, MachineSpec, Nic, build_argv, kernel_cmdline
from vzkit.engines.qemu.disks import QemuState
from vzkit.engines.qemu.hotplug import QemuVolumes, opened_volumes
from vzkit.engines.qemu.layers import QemuDisks
from vzkit.engines.qemu.transfer import QemuExport
from vzkit.errors import AgentError, EngineError, NotFound, StateError
from vzkit.host import perms, safefs
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

# What a running VM refuses (the change applies at its next start instead).
_NIC_REFUSALS = {
    "nic-attach": Refusal(
        StateError,
        "cannot add a network interface to {name!r} while it runs",
        "stop it first (vz stop {name}); the interface is added at the next start",
    ),
    "nic-detach": Refusal(
        StateError,
        "cannot remove a network interface from {name!r} while it runs",
        "stop it first: vz stop {name}",
    ),
}
_MICROVM_REFUSALS = {
    f"volume-{verb}": Refusal(
        StateError,
        f"cannot {verb} a volume while micro-VM {{name!r}} runs (virtio-mmio has no hot-plug)",
        "stop it first (vz stop {name}); the change applies at the next start",
    )
    for verb in ("attach", "detach")
}


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
    # When quiesce() last prepared a memory snapshot: its disk then needs no freeze.
    memory_snapshot_at: float = 0.0


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
        disks, volumes, export = QemuDisks(self), QemuVolumes(self), QemuExport(self)
        common = Capabilities(
            snapshots=disks,
            export=export,
            live_export=export,  # from a frozen disk layer
            disk_layers=disks,
            memory_snapshots=self,
            volume_resize=volumes,
            publish=disks,
            tap_nics=True,
            block_volumes=True,
        )
        self._caps = {
            InstanceType.VM: dataclasses.replace(
                common, live_volumes=volumes, refusals=_NIC_REFUSALS
            ),
            InstanceType.MICROVM: dataclasses.replace(
                common, refusals=_NIC_REFUSALS | _MICROVM_REFUSALS
            ),
        }

    def capabilities(self, kind: InstanceType) -> Capabilities:
        return self._caps[kind]

    def load_state(self, data: str) -> EngineState:
        return QemuState.model_validate_json(data)

    def runtime_dir(self, uuid: str) -> Path:
        return self.settings.instance_runtime_dir / uuid

    # -- lifecycle ---------------------------------------------------------------------

    async def create(self, inst: Instance, uuid: str) -> EngineState:
        image = self.images.get(inst.image)
        group = perms.qemu_gid(self.settings)
        sdir = perms.vm_dir(self.state_dir(uuid), group)
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
            perms.share_file(sdir / "root.qcow2", group, perms.DISK)
        return QemuState()

    async def start(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        return await self._boot(inst, uuid, QemuState.of(state), net, volumes, None)

    async def start_from(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        memory: Path,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        """Start a new QEMU that loads saved memory (``-incoming``) instead of booting."""
        return await self._boot(inst, uuid, QemuState.of(state), net, volumes, memory)

    async def _boot(
        self,
        inst: Instance,
        uuid: str,
        state: QemuState,
        net: NetPlan,
        volumes: Sequence[VolumeMount],
        restore: Path | None,
    ) -> Started:
        if inst.name in self._live:
            raise EngineError(f"instance {inst.name!r} already has a running QEMU")
        t0 = time.monotonic()
        image = self.images.get(inst.image)
        self.images.check(image)
        sdir, rdir = self.state_dir(uuid), self.runtime_dir(uuid)
        perms.vm_dir(sdir, perms.qemu_gid(self.settings))
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True, mode=0o700)
        accel = inst.accel or Accel(self.host.accel)
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
            spec = self._machine(inst, uuid, image, state, accel, net, volumes)
            t_spawn = time.monotonic()
            pid = await self._launch(spec, volumes, cgroup, restore)
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
            agent = await self._ready(live, inst, net, volumes, restore)
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
                accel=accel,
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

    def _machine(
        self,
        inst: Instance,
        uuid: str,
        image: ImageInfo,
        state: QemuState,
        accel: Accel,
        net: NetPlan,
        volumes: Sequence[VolumeMount],
    ) -> MachineSpec:
        """The machine to launch; its descriptor fields are filled in by :meth:`_launch`."""
        sdir, rdir = self.state_dir(uuid), self.runtime_dir(uuid)
        disks: tuple[Disk, ...] = ()
        root = None
        extra_args = image.files.get("cmdline", "")
        if image.files.get("rootfs"):
            disks = (Disk(sdir / state.disk),)
            # The root disk is the first virtio-blk device; the image may name it itself.
            root = None if "vz.root=" in extra_args else "/dev/vda"
        disks += tuple(
            Disk(v.host_path, node=v.device_id, read_only=v.readonly, serial=v.name[:20])
            for v in volumes
        )
        return MachineSpec(
            name=inst.name,
            uuid=uuid,
            type=inst.type,
            cpus=inst.limits.cpus,
            memory=inst.limits.memory,
            accel=accel,
            kernel=Path(image.files["kernel"]),
            initrd=Path(image.files["initrd"]),
            cmdline=kernel_cmdline(
                hostname=inst.name, tsc_khz=self.host.tsc_khz, root=root, extra=extra_args
            ),
            qmp_fd=-1,
            agent_fd=-1,
            console_fd=-1,
            console_log=sdir / "console.log",
            pid_file=rdir / "qemu.pid",
            disks=disks,
            nics=tuple(Nic(n.host_name, n.mac) for n in net.nics),
        )

    async def _launch(
        self,
        spec: MachineSpec,
        volumes: Sequence[VolumeMount],
        cgroup: Cgroup | None,
        restore: Path | None,
    ) -> int:
        """Start QEMU on listening sockets made here (so nothing waits for a path to
        appear); returns its pid once it has daemonized."""
        sdir, rdir = self.state_dir(spec.uuid), self.runtime_dir(spec.uuid)
        socks = [process.listen_unix(rdir / n) for n in ("qmp.sock", "agent.sock", "console.sock")]
        state_fd = safefs.open_file(restore.parent, restore.name) if restore else None
        jail = self._jail(sdir, rdir) if self.settings.jail else None
        with process.closing_all(socks), _closing_fd(state_fd), opened_volumes(volumes) as vols:
            spec = dataclasses.replace(
                spec,
                qmp_fd=socks[0].fileno(),
                agent_fd=socks[1].fileno(),
                console_fd=socks[2].fileno(),
                disks=tuple(dataclasses.replace(d, fd=vols.get(d.node)) for d in spec.disks),
                extra=tuple(savestate.incoming_args(state_fd) if state_fd else ()),
            )
            # A fresh boot starts a fresh console log.
            # (emptied in place, never through a link, and handed to QEMU's user)
            safefs.truncate(sdir, spec.console_log.name, 0o600, owner=self.user)
            self._give(rdir, *(d.path for d in spec.disks if d.fd is None))
            return await process.launch(
                build_argv(self.settings.qemu_binary, spec),
                pass_fds=[s.fileno() for s in socks]
                + ([state_fd] if state_fd else [])
                + list(vols.values()),
                procs_files=cgroup.procs_files() if cgroup else [],
                pid_file=spec.pid_file,
                log_file=sdir / "qemu.log",
                jail=jail,
            )

    async def _ready(
        self,
        live: _Live,
        inst: Instance,
        net: NetPlan,
        volumes: Sequence[VolumeMount],
        restore: Path | None,
    ) -> AgentClient:
        """Wait for the guest's agent, then configure its NICs and volumes."""
        if restore is not None:
            assert live.qmp is not None
            await savestate.wait_loaded(live.qmp)
            await live.qmp.execute("cont")
        agent = await self._wait_agent(live, BOOT_TIMEOUT)
        if net.nics or restore:
            # After a restore the guest may be another instance's memory: rename it too.
            await guest.configure(agent, net.guest_script(inst.name if restore else None))
        if volumes:
            await guest.configure(
                agent, guest.disk_links([v.name[:20] for v in volumes]), "disks", "see the console"
            )
        return agent

    def _jail(self, sdir: Path, rdir: Path) -> process.Jail:
        """QEMU sees the images and its own instance directories, nothing else of vzkit's
        (its volumes come as descriptors)."""
        s = self.settings
        keep = [(s.images_dir, True), (sdir, False), (rdir, False)]
        qemu = shutil.which(s.qemu_binary)
        if qemu and not any(Path(qemu).is_relative_to(d) for d in process.SYSTEM_DIRS):
            keep.append((Path(qemu), True))
        return process.Jail(keep=tuple(keep), user=self.user)

    def _give(self, *paths: Path) -> None:
        """Hand files QEMU writes to its user (created by vzd, as root), none to others."""
        for path in paths:
            if self.user is not None:
                os.chown(path, *self.user, follow_symlinks=False)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o007)

    async def attach(self, inst: Instance, uuid: str, state: EngineState) -> str | None:
        pid = inst.pid
        if pid is None:
            # vzd died during the boot, before it recorded the pid: QEMU's pid file has it.
            with contextlib.suppress(OSError, ValueError):
                pid = int(safefs.read_text(self.runtime_dir(uuid), "qemu.pid", 64).strip())
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

    # -- memory snapshots ------------------------------------------------------------------

    async def quiesce(self, name: str) -> None:
        """Make the memory cheap to save: migration sends a zero page as one flag, but the
        pages a booted kernel has freed still hold their old bytes (~70 MB of a 256 MiB
        micro-VM). The guest drops its caches and writes zeros over its free memory."""
        live = self._get(name)
        agent = await self._agent(live)
        with contextlib.suppress(AgentError):
            await agent.run(["/bin/sh", "-c", guest.ZERO_FREE_MEMORY], timeout=60)
        live.memory_snapshot_at = time.monotonic()

    def memory_snapshot_started(self, name: str) -> bool:
        """Whether quiesce() has just prepared a memory snapshot of ``name`` (the mark is
        consumed): its disk is captured with the memory and needs no freeze."""
        live = self._live.get(name)
        if live is None:
            return False
        at, live.memory_snapshot_at = live.memory_snapshot_at, 0.0
        # A mark older than this is from a snapshot that failed before its capture.
        return at > 0.0 and time.monotonic() - at < 120.0

    async def save_state(self, name: str, dest: Path) -> int:
        live = self._get(name)
        assert live.qmp is not None
        return await savestate.save(live.qmp, dest)

    async def io_stats(self, name: str) -> tuple[int, int] | None:
        """Bytes read and written by the guest, over all its disks."""
        live = self._live.get(name)
        if live is None or live.qmp is None:
            return None
        devices: Any = await live.qmp.execute("query-blockstats")
        read = sum(int(d.get("stats", {}).get("rd_bytes", 0)) for d in devices)
        written = sum(int(d.get("stats", {}).get("wr_bytes", 0)) for d in devices)
        return read, written

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
            with contextlib.suppress(OSError):
                fd = safefs.open_file(self.state_dir(live.uuid), "console.log", os.O_RDWR)
                with os.fdopen(fd, "r+b") as f:
                    if os.fstat(fd).st_size > CONSOLE_LOG_MAX:
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

    # -- internals (and what the capability objects beside the engine use) ----------------

    def _get(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            raise NotFound(
                f"instance {name!r} has no running QEMU", hint=f"start it first: vz start {name}"
            )
        return live

    def is_running(self, name: str) -> bool:
        return name in self._live

    def qmp(self, name: str) -> QMPClient:
        """The QMP session of a running instance (NotFound when it is not running)."""
        live = self._get(name)
        if live.qmp is None:
            raise EngineError(f"no QMP connection to {name!r}")
        return live.qmp

    def running_qmp(self, name: str) -> QMPClient | None:
        live = self._live.get(name)
        return None if live is None else live.qmp

    async def agent(self, name: str) -> AgentClient:
        return await self._agent(self._get(name))

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


@contextlib.contextmanager
def _closing_fd(fd: int | None) -> Iterator[None]:
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
