"""The container engine: system containers run by vz-runtime, managed like VMs.

Each container gets an overlayfs root (the image's unpacked tree below, its own upper
layer above), an OCI bundle generated from the instance's config, and the agent in
reaper mode as PID 1. The daemon drives ``vz-runtime`` as a subprocess, never forking
itself: the container's init is reparented away from the daemon and survives it, and the
daemon re-attaches with a pidfd, as it does for QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzkit._proc import alive
from vzkit.api.instances import ExecRequest, Instance, InstanceType, Limits
from vzkit.engines.base import (
    Capabilities,
    ConsoleStream,
    EngineState,
    ExecSession,
    ExitInfo,
    Refusal,
    Started,
)
from vzkit.engines.common import ProcessEngine
from vzkit.engines.container import idmap as ids
from vzkit.engines.container.files import WORK_DIRS, ContainerFiles, ContainerState
from vzkit.engines.container.idmap import IdMap
from vzkit.engines.container.inroot import replace_file
from vzkit.engines.container.sessions import LogConsole, Proc, TtyProc, receive_fd, set_winsize
from vzkit.errors import (
    AgentError,
    Conflict,
    EngineError,
    InvalidConfig,
    NotFound,
    StateError,
    VzError,
)
from vzkit.host import perms, safefs
from vzkit.host.cgroups import CgroupDriver, weight_to_shares
from vzkit.images.rootfs import container_rootfs
from vzkit.images.store import ImageStore
from vzkit.network import links, nics
from vzkit.network.nics import NetPlan, NicPlan
from vzkit.settings import Settings
from vzkit.storage.manager import VolumeMount

log = logging.getLogger(__name__)


def _runtime_command() -> list[str]:
    # scripts/setup puts a fast launcher (python -IS) beside the interpreter; each call
    # of the runtime pays Python's start-up, so it matters for exec latency.
    launcher = shutil.which("vz-runtime", path=os.path.dirname(sys.executable))
    return [launcher] if launcher else [sys.executable, "-m", "vzkit_runtime"]


RUNTIME = _runtime_command()
INIT = ["/sbin/vz-agent", "--reaper"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
# As podman: no raw sockets (packet forging, ARP spoofing on the bridge); ping works through
# ICMP datagram sockets, which the ping group range opens to every group of the container.
DROPPED_CAPS = ("CAP_NET_RAW",)

# What containers cannot do, and what a request for it is told.
REFUSALS = {
    "snapshot-stateful": Refusal(
        InvalidConfig,
        "containers have no stateful snapshots (their processes are not checkpointed)",
        "take a snapshot without --stateful: it keeps the container's files",
    ),
    "export": Refusal(
        StateError,
        "cannot export {name!r} while it runs: a container's files change under it",
        "stop it first: vz stop {name}",
    ),
    "publish": Refusal(
        InvalidConfig,
        "containers cannot be published as images yet",
        "copy it instead (vz copy {name} NEW), or export it",
    ),
}


@dataclass
class _Live:
    name: str
    uuid: str
    pid: int
    idmap: IdMap | None  # None: privileged (no user namespace)
    stop_requested: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class ContainerEngine(ProcessEngine):
    def __init__(self, settings: Settings, images: ImageStore, cgroups: CgroupDriver | None):
        super().__init__(settings)
        self.images = images
        self.cgroups = cgroups
        self.root = settings.runtime_dir / "containers"
        self._live: dict[str, _Live] = {}
        self._spec: dict[str, Any] | None = None
        self._idmap: IdMap | None = None
        self._userns: dict[IdMap, int] = {}  # a user namespace per map, kept for idmapped mounts
        files = ContainerFiles(self, self.make_dirs, self.host_idmap)
        # Live volumes are bind mounts (vz-runtime mount); NICs are veths plugged live.
        self._caps = Capabilities(
            snapshots=files, export=files, live_volumes=self, nic_hotplug=self, refusals=REFUSALS
        )

    def capabilities(self, kind: InstanceType) -> Capabilities:
        return self._caps

    def load_state(self, data: str) -> EngineState:
        return ContainerState.model_validate_json(data)

    def _cgroup_path(self, name: str) -> str:
        return self.settings.instance_cgroup(name)

    # -- the runtime -------------------------------------------------------------------

    async def _runtime(self, *args: str, check: bool = True) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *RUNTIME,
            "--root",
            str(self.root),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        rc = proc.returncode or 0
        if check and rc != 0:
            raise EngineError(
                f"vz-runtime {args[0]} failed: {err.decode(errors='replace').strip()[-2000:]}"
            )
        return rc, out.decode()

    # -- lifecycle ---------------------------------------------------------------------

    async def create(self, inst: Instance, uuid: str) -> EngineState:
        image = self.images.get(inst.image)
        idmap = None if inst.security.privileged else self.host_idmap()
        lower = await asyncio.to_thread(container_rootfs, self.settings, image)
        state = ContainerState(lower=str(lower), idmap=idmap)
        await asyncio.to_thread(self.make_dirs, self.state_dir(uuid), state)
        return state

    def host_idmap(self) -> IdMap:
        """The map of new unprivileged containers (HostUnsupported without subordinate ids)."""
        if self._idmap is None:
            self._idmap = ids.host_idmap()
        return self._idmap

    @staticmethod
    def make_dirs(sdir: Path, state: ContainerState) -> None:
        """The instance directory (closed to everyone but root) and its layers, the upper
        one and the overlay's work directory owned by the container's root."""
        perms.make_dir(sdir, perms.PRIVATE)
        for d in ("upper", *WORK_DIRS):
            with contextlib.suppress(FileExistsError):
                (sdir / d).mkdir()
            # An imported archive's "upper" may be anything: chown must not follow a link.
            if not stat.S_ISDIR(os.lstat(sdir / d).st_mode):
                raise InvalidConfig(f"the container's {d!r} is not a directory")
            if state.idmap is not None and d in ("upper", "work"):
                os.lchown(sdir / d, *state.idmap.root)

    def _run_dir(self, uuid: str) -> Path:
        """Where the container's root is mounted: entered by vz-runtime as the container's
        root (so owned by it), closed to everyone else."""
        return self.settings.instance_runtime_dir / uuid

    async def _base_spec(self) -> dict[str, Any]:
        """The runtime's own default config.json (``vz-runtime spec``), read once: each
        container's config is built on it, so the defaults (capabilities, masked paths,
        seccomp profile, device rules) are the runtime's, spoken only through its CLI."""
        if self._spec is None:
            with tempfile.TemporaryDirectory(prefix="vz-spec-") as bundle:
                await self._runtime("spec", "--bundle", bundle)
                self._spec = json.loads((Path(bundle) / "config.json").read_text())
        spec: dict[str, Any] = json.loads(json.dumps(self._spec))
        return spec

    async def _write_bundle(
        self, inst: Instance, sdir: Path, rootfs: Path, idmap: IdMap | None
    ) -> None:
        spec = await self._base_spec()
        process = spec["process"]
        process.update(
            terminal=False,
            args=INIT,
            cwd="/",
            env=[f"PATH={DEFAULT_PATH}", "TERM=xterm", "container=vz"],
        )
        for kind, caps in process["capabilities"].items():
            process["capabilities"][kind] = [c for c in caps if c not in DROPPED_CAPS]
        spec["root"] = {"path": str(rootfs), "readonly": False}
        spec["hostname"] = inst.name
        limits = inst.limits
        cpu: dict[str, Any] = {
            "shares": weight_to_shares(limits.cpu_weight),
            "quota": limits.cpus * CPU_PERIOD_US,
            "period": CPU_PERIOD_US,
        }
        if limits.cpu_pin:
            cpu["cpus"] = ",".join(map(str, limits.cpu_pin))
        linux = spec.setdefault("linux", {})
        linux["cgroupsPath"] = self._cgroup_path(inst.name)
        # Merged, not replaced: the spec's device rules (deny all, then the runtime's
        # default allow-list) must survive, or a container with CAP_MKNOD opens any device.
        resources = linux.setdefault("resources", {})
        resources.update(memory={"limit": limits.memory}, cpu=cpu, pids={"limit": limits.processes})
        # The range is of the writer's user namespace: an unprivileged container's groups
        # end at its map's size (a gid outside it makes the kernel refuse the whole range).
        top = idmap.size - 1 if idmap is not None else 2**31 - 1
        linux.setdefault("sysctl", {})["net.ipv4.ping_group_range"] = f"0 {top}"
        if idmap is not None:
            linux["namespaces"].append({"type": "user"})
            linux.update(idmap.oci())
        safefs.replace_bytes(sdir, "bundle/config.json", json.dumps(spec, indent=1).encode())

    def _mount_rootfs(self, uuid: str, state: ContainerState, userns_fd: int | None) -> Path:
        """The overlay (the image's tree below, idmapped for an unprivileged container)
        mounted at the run directory; returns where (blocking)."""
        sdir, rdir = self.state_dir(uuid), self._run_dir(uuid)
        uid, gid = state.idmap.root if state.idmap is not None else (0, 0)
        perms.make_dir(rdir, perms.PRIVATE, group=gid, owner=uid)
        target = rdir / "rootfs"
        target.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(target):
            ids.mount_overlay(
                target,
                Path(state.lower),
                sdir / "upper",
                sdir / "work",
                userns_fd=userns_fd,
                scratch=rdir / "lower",
            )
        return target

    def _unmount_rootfs(self, uuid: str) -> None:
        rdir = self._run_dir(uuid)
        # The state dir's rootfs: where containers started before the run directory were.
        for target in (rdir / "rootfs", self.state_dir(uuid) / "rootfs"):
            if os.path.ismount(target):
                ids.unmount(target)
        for d in (rdir / "rootfs", rdir / "lower", rdir):
            with contextlib.suppress(OSError):
                d.rmdir()  # never rmtree: a mount left there would lose the container's files

    async def _userns_fd(self, idmap: IdMap | None) -> int | None:
        if idmap is None:
            return None
        if idmap not in self._userns:
            self._userns[idmap] = await asyncio.to_thread(ids.make_userns, idmap)
        return self._userns[idmap]

    async def start(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        if inst.name in self._live:
            raise EngineError(f"container {inst.name!r} is already running")
        sdir = self.state_dir(uuid)
        cstate = ContainerState.of(state)
        userns_fd = await self._userns_fd(cstate.idmap)
        rootfs = await asyncio.to_thread(self._mount_rootfs, uuid, cstate, userns_fd)
        try:
            await self._write_bundle(inst, sdir, rootfs, cstate.idmap)
            if net.nics:
                await asyncio.to_thread(_write_resolv_conf, rootfs, net.resolv_conf(), cstate)
            return await self._create_and_start(inst, uuid, cstate, net, volumes)
        except BaseException:
            await asyncio.to_thread(self._unmount_rootfs, uuid)
            raise

    async def _create_and_start(
        self,
        inst: Instance,
        uuid: str,
        state: ContainerState,
        net: NetPlan,
        volumes: Sequence[VolumeMount],
    ) -> Started:
        sdir = self.state_dir(uuid)
        log_path = sdir / "console.log"
        error_log = sdir / "runtime.log"
        pid_file = sdir / "init.pid"
        for stale in (pid_file, error_log):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            with os.fdopen(safefs.open_file(sdir, log_path.name, flags), "ab") as console:
                # The init inherits these as its stdio, so no pipe may be among them (it
                # would never reach EOF); the runtime's own errors go to its --log file.
                proc = await asyncio.create_subprocess_exec(
                    *RUNTIME,
                    "--root",
                    str(self.root),
                    "--log",
                    str(error_log),
                    "create",
                    "--bundle",
                    str(sdir / "bundle"),
                    "--pid-file",
                    str(pid_file),
                    uuid,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=console,
                    stderr=console,
                )
                await proc.wait()
            if proc.returncode != 0:
                why = ""
                with contextlib.suppress(OSError):
                    why = safefs.read_tail(sdir, error_log.name, 2000).decode(errors="replace")
                raise EngineError(
                    f"creating container {inst.name!r} failed: {why or 'see ' + str(log_path)}"
                )
            # Volumes as live attaches do it, before the init runs: vz-runtime clones them
            # on the host, so the container's root never needs to pass the pool's directories.
            for volume in volumes:
                await self._mount_volume(uuid, state.idmap, volume)
            await self._runtime("start", uuid)
            pid = int(safefs.read_text(sdir, pid_file.name, 64))
            live = _Live(inst.name, uuid, pid, state.idmap)
            self._live[inst.name] = live
            self._watch(live)
            for nic in net.nics:
                await asyncio.to_thread(_plug_veth, pid, nic)
        except BaseException:
            self._live.pop(inst.name, None)
            await self._runtime("delete", "--force", uuid, check=False)
            raise
        return Started(pid=pid)

    async def attach(self, inst: Instance, uuid: str, state: EngineState) -> str | None:
        rc, out = await self._runtime("state", uuid, check=False)
        status = json.loads(out).get("status") if rc == 0 else None
        if status not in ("running", "paused") or inst.pid is None or not alive(inst.pid):
            await self._cleanup(uuid)
            return None
        live = _Live(inst.name, uuid, inst.pid, ContainerState.of(state).idmap)
        self._live[inst.name] = live
        self._watch(live)
        return str(status)

    async def stop(self, name: str, *, force: bool, timeout: float) -> None:
        live = self._get(name)
        live.stop_requested = True
        if not force:
            await self._runtime("kill", live.uuid, "TERM", check=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.exited.wait(), timeout)
                return
            log.info("%s did not stop within %.0fs: killing it", name, timeout)
        # kill --all KILL freezes the cgroup, kills everything in it and thaws it until it
        # is empty: a fork bomb cannot outrun it.
        await self._runtime("kill", "--all", live.uuid, "KILL", check=False)
        await live.exited.wait()

    async def update(self, inst: Instance, limits: Limits) -> None:
        live = self._get(inst.name)
        args = [
            "update",
            "--memory",
            str(limits.memory),
            "--cpu-quota",
            str(limits.cpus * CPU_PERIOD_US),
            "--cpu-period",
            str(CPU_PERIOD_US),
            "--cpu-shares",
            str(weight_to_shares(limits.cpu_weight)),
        ]
        if limits.cpu_pin:
            args += ["--cpuset-cpus", ",".join(map(str, limits.cpu_pin))]
        args += ["--pids-limit", str(limits.processes)]
        # The bundle is written anew at the next start, from the stored limits.
        await self._runtime(*args, live.uuid)

    async def io_stats(self, name: str) -> tuple[int, int] | None:
        return None  # the block layer is the host's; cgroup io accounting is not read yet

    async def attach_volume(self, name: str, volume: VolumeMount) -> None:
        live = self._get(name)
        await self._mount_volume(live.uuid, live.idmap, volume)

    async def _mount_volume(self, uuid: str, idmap: IdMap | None, volume: VolumeMount) -> None:
        assert volume.target is not None
        if idmap is not None:
            await asyncio.to_thread(_hand_over, volume.host_path, idmap)
        ro = ["--readonly"] if volume.readonly else []
        await self._runtime("mount", *ro, uuid, str(volume.host_path), volume.target)

    async def detach_volume(self, name: str, volume: VolumeMount) -> None:
        assert volume.target is not None
        await self._runtime("umount", self._get(name).uuid, volume.target)

    async def plug(self, name: str, nic: NicPlan) -> None:
        await asyncio.to_thread(_plug_veth, self._get(name).pid, nic)

    async def unplug(self, name: str, nic: NicPlan) -> None:
        self._get(name)
        # Deleting the host end takes the container's end with it.
        await asyncio.to_thread(links.delete_link, nic.host_name)

    async def pause(self, name: str) -> None:
        await self._runtime("pause", self._get(name).uuid)

    async def resume(self, name: str) -> None:
        await self._runtime("resume", self._get(name).uuid)

    async def destroy(self, inst: Instance, uuid: str) -> None:
        live = self._live.get(inst.name)
        if live is not None:
            live.stop_requested = True
            await self._runtime("kill", "--all", uuid, "KILL", check=False)
            await live.exited.wait()
        await self._cleanup(uuid)
        await asyncio.to_thread(shutil.rmtree, self.state_dir(uuid), ignore_errors=True)

    async def _cleanup(self, uuid: str) -> None:
        await self._runtime("delete", "--force", uuid, check=False)
        await asyncio.to_thread(self._unmount_rootfs, uuid)

    async def close(self) -> None:
        for live in self._live.values():
            self.unwatch_exit(live.pid)
        self._live.clear()
        for fd in self._userns.values():
            os.close(fd)
        self._userns.clear()

    # -- guest access ------------------------------------------------------------------

    async def exec(self, name: str, req: ExecRequest) -> ExecSession:
        live = self._get(name)
        if req.tty:
            return await self._exec_tty(live, req)
        args = ["exec"]
        if req.cwd:
            args += ["--cwd", req.cwd]
        for k, v in req.env.items():
            args += ["--env", f"{k}={v}"]
        proc = await asyncio.create_subprocess_exec(
            *RUNTIME,
            "--root",
            str(self.root),
            *args,
            live.uuid,
            "--",
            *req.argv,
            stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return Proc(proc, req.timeout, lambda: self._oom_kills(name))

    async def _exec_tty(self, live: _Live, req: ExecRequest) -> ExecSession:
        sock_dir = self.settings.runtime_dir / "consoles"
        sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = sock_dir / f"{live.uuid[:8]}-{os.urandom(4).hex()}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        args = ["exec", "--tty", "--console-socket", str(path)]
        args += ["--console-size", f"{req.rows}x{req.cols}"]
        if req.cwd:
            args += ["--cwd", req.cwd]
        for k, v in {"TERM": "xterm-256color", **req.env}.items():
            args += ["--env", f"{k}={v}"]
        proc = await asyncio.create_subprocess_exec(
            *RUNTIME,
            "--root",
            str(self.root),
            *args,
            live.uuid,
            "--",
            *req.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            master = await asyncio.wait_for(asyncio.to_thread(receive_fd, server), 30)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _, err = await proc.communicate()
            raise EngineError(
                f"terminal exec in {live.name!r} failed: {err.decode(errors='replace').strip()}"
            ) from None
        finally:
            server.close()
            path.unlink(missing_ok=True)
        set_winsize(master, req.rows, req.cols)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(master), "rb", 0)
        )
        return TtyProc(proc, master, reader, req.timeout)

    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None:
        # vz-runtime writes it from inside the container's mount namespace (its own view:
        # a tmpfs /tmp, volumes; its symlinks resolve in it), running none of its binaries.
        # A setuid/setgid mode reaches here only when the caller asked for it (the API
        # refuses it otherwise), so the runtime is told it was asked for.
        args = ["file-write", "--mode", f"{mode:o}", *(["--parents"] if parents else [])]
        if mode & 0o6000:
            args.append("--allow-setid")
        proc = await self._runtime_proc(*args, self._get(name).uuid, path, stdin=True)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            async for chunk in data:
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runtime gave up: its error follows
        except BaseException:
            # Stopped mid-stream: the runtime (and its helper, by PDEATHSIG) must not
            # mistake the end of its input for the end of the file and commit a part.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
            raise
        proc.stdin.close()
        err = await proc.stderr.read()
        if await proc.wait() != 0:
            raise _runtime_failure(
                f"cannot write {path} in {name!r}",
                err,
                hint="check that the directory exists (or pass parents) and is writable",
            )

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        proc = await self._runtime_proc("file-read", "--header", self._get(name).uuid, path)
        assert proc.stdout is not None and proc.stderr is not None
        line = await proc.stdout.readline()
        if not line:
            err = await proc.stderr.read()
            await proc.wait()
            raise _runtime_failure(f"cannot read {path} in {name!r}", err)
        mode = int(json.loads(line)["mode"])
        stdout = proc.stdout

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while data := await stdout.read(65536):
                    yield data
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await proc.wait()

        return mode, chunks()

    async def _runtime_proc(self, *args: str, stdin: bool = False) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *RUNTIME,
            "--root",
            str(self.root),
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if not stdin else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    async def open_console(self, name: str) -> ConsoleStream:
        return LogConsole(self.state_dir(self._get(name).uuid) / "console.log")

    # -- exits ---------------------------------------------------------------------------

    def _get(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            raise NotFound(
                f"container {name!r} is not running", hint=f"start it first: vz start {name}"
            )
        return live

    def _watch(self, live: _Live) -> None:
        self.watch_exit(live.pid, lambda: self._handle_exit(live))

    async def _handle_exit(self, live: _Live) -> None:
        if self._live.get(live.name) is live:
            del self._live[live.name]
        oom = self._oom_kills(live.name)
        await self._cleanup(live.uuid)
        live.exited.set()
        if live.stop_requested:
            info = ExitInfo(live.pid, True, "stopped")
        elif oom:
            info = ExitInfo(
                live.pid,
                False,
                "killed by the out-of-memory killer: the "
                "container used all the memory its limit allows",
            )
        else:
            info = ExitInfo(live.pid, False, f"its init (pid {live.pid}) exited unexpectedly")
        await self.report_exit(live.name, info)

    def _oom_kills(self, name: str) -> int:
        if self.cgroups is None:
            return 0
        cg = self.cgroups.open(self._cgroup_path(name))
        if cg is None:
            return 0
        with contextlib.suppress(Exception):
            return int(cg.stats().oom_kills or 0)
        return 0


def _plug_veth(pid: int, nic: NicPlan) -> None:
    nics.plug_veth(pid, nic)


def _write_resolv_conf(rootfs: Path, text: str, state: ContainerState) -> None:
    """/etc/resolv.conf as the container resolves it (its symlinks stay inside it), owned
    by its root. A container that broke its own /etc keeps it broken: that is logged."""
    owner = state.idmap.root if state.idmap is not None else (0, 0)
    try:
        replace_file(rootfs, "/etc/resolv.conf", text.encode(), mode=0o644, owner=owner)
    except EngineError as exc:
        log.warning("resolv.conf not written: %s", exc.message)


def _hand_over(volume: Path, idmap: IdMap) -> None:
    """A fresh filesystem volume (empty, host root's) becomes the container's root's, so
    that it can write to it; a used one keeps its owners (see the README: volumes)."""
    st = volume.lstat()
    if (st.st_uid, st.st_gid) == (0, 0) and not any(volume.iterdir()):
        os.lchown(volume, *idmap.root)


def _runtime_error(stderr: bytes) -> str:
    """The runtime's ``error: ...`` line (its hint is for its own command line)."""
    text = stderr.decode(errors="replace").strip()
    for line in text.splitlines():
        if line.startswith("error: "):
            return line[len("error: ") :]
    return text[-2000:] or "vz-runtime failed without saying why"


# The runtime's error codes (its ``code: ...`` line) that are the caller's mistake.
_CALLER_ERRORS: dict[str, type[VzError]] = {
    "not_found": NotFound,
    "invalid_config": InvalidConfig,
    "conflict": Conflict,
}


def _runtime_failure(message: str, stderr: bytes, hint: str | None = None) -> VzError:
    """A file operation's failure as the kind the runtime reported (else an AgentError)."""
    text = stderr.decode(errors="replace")
    code = next((ln[6:].strip() for ln in text.splitlines() if ln.startswith("code: ")), "")
    kind = _CALLER_ERRORS.get(code, AgentError)
    return kind(f"{message}: {_runtime_error(stderr)}", hint=hint)
