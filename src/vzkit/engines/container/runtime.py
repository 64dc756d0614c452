"""The OCI lifecycle: create, start, kill, delete (and run = all four), exec, pause/resume,
update, ps, list. Library code: raises vzkit errors, never prints or exits.

Heavy modules (vzkit.host.cgroups and what it pulls in) are imported inside the
functions that need them, so `state` and `kill` stay cheap.
"""

from __future__ import annotations

import os
import time

from vzkit.engines.container import jsonfast as json
from vzkit.engines.container import spec as oci
from vzkit.engines.container.state import (
    CONFIG_FILE,
    FIFO,
    State,
    alive,
    container_dir,
    load,
    proc_start_time,
    remove_tree,
    write_atomic,
)
from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    InvalidConfig,
    NotFound,
    StateError,
    VzError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable
    from typing import Any

    from vzkit.engines.container.init import InitContext
    from vzkit.engines.container.spec import Json

    Warn = Callable[[str], None]

_START_TIMEOUT_S = 10.0
_DEATH_TIMEOUT_S = 5.0


def _noop(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------- cgroups


def cgroup_path(spec: Json, container_id: str) -> str:
    path = (spec.get("linux") or {}).get("cgroupsPath")
    if not path:
        return f"vz-runtime/{container_id}"
    if ":" in path:
        raise HostUnsupported(
            f"cgroupsPath {path!r} is in systemd slice:prefix:name form",
            hint="the systemd cgroup driver is not supported; use a path like /vz/ID",
        )
    return str(path).strip("/")


def _parse_cpus(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise InvalidConfig(f"invalid cpu list {text!r}", hint="write it as 0-2,4") from None
    return cpus


def limits_from_resources(resources: Json, base: Json | None = None) -> Json:
    """OCI linux.resources -> CgroupLimits fields (v2 terms), on top of ``base``."""
    out: Json = dict(base or {})
    mem = resources.get("memory") or {}
    limit = mem.get("limit")
    if limit is not None:
        out["memory_max"] = int(limit) if int(limit) > 0 else None
    swap = mem.get("swap")
    if swap is not None:
        # OCI's swap is memory+swap (v1 memsw); CgroupLimits counts swap alone.
        total, memory = int(swap), out.get("memory_max")
        out["memory_swap_max"] = max(0, total - memory) if total > 0 and memory else None
    cpu = resources.get("cpu") or {}
    if cpu.get("shares") is not None:
        shares = int(cpu["shares"])
        # The inverse of weight_to_shares (rounded up, so the shares read back >= asked).
        out["cpu_weight"] = max(1, min(10000, -(-shares * 100 // 1024))) if shares else None
    if cpu.get("quota") is not None:
        quota, period = int(cpu["quota"]), int(cpu.get("period") or 100_000)
        out["cpu_quota"] = quota / period if quota > 0 else None
    if cpu.get("cpus"):
        out["cpuset_cpus"] = _parse_cpus(str(cpu["cpus"]))
    pids = resources.get("pids") or {}
    if pids.get("limit") is not None:
        out["pids_max"] = int(pids["limit"]) if int(pids["limit"]) > 0 else None
    weight = (resources.get("blockIO") or {}).get("weight")
    if weight:
        # v1 blkio 10..1000 -> v2 io.weight 1..10000 (io_weight_to_v1's inverse).
        out["io_weight"] = 1 + (int(weight) - 10) * 9999 // 990
    return out


def _open_cgroup(st: State) -> Any:
    from vzkit.host import cgroups

    path = st.data.get("cgroupPath")
    return cgroups.detect().open(path) if path else None


# ---------------------------------------------------------------------------- create


class _Undo:
    """Undo steps run in reverse when create fails: nothing half-made survives."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], object]] = []

    def push(self, fn: Callable[[], object]) -> None:
        self.steps.append(fn)

    def run(self) -> None:
        for fn in reversed(self.steps):
            # Best effort: the error that made create fail is the one to report.
            try:
                fn()
            except Exception:
                pass
        self.steps.clear()


class _Reader:
    """P's end of the children's JSON-lines pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self) -> Json | None:
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: Json = json.loads(line)
        return msg


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _write_maps(pid: int, linux: Json) -> None:
    rootless = os.geteuid() != 0
    for kind, key in (("uid", "uidMappings"), ("gid", "gidMappings")):
        lines = "".join(
            f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in linux.get(key) or []
        )
        if kind == "gid" and rootless:
            # An unprivileged writer may only map its gid once setgroups is denied.
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        if not lines:
            raise InvalidConfig(f"a user namespace needs linux.{key}")
        try:
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write(lines)
        except OSError as exc:
            raise EngineError(
                f"write {kind}_map for the user namespace: {exc.strerror}",
                hint="unprivileged users may map only their own id (size 1)",
            ) from None


def _spawn(ctx: InitContext, child_ends: tuple[int, int], parent_ends: tuple[int, int]) -> int:
    """Fork the middle process M (user/time namespaces, exec)."""
    from vzkit.engines.container.init import middle

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(parent_ends[0])
            os.close(parent_ends[1])
            middle(ctx)
        finally:
            os._exit(1)
    os.close(child_ends[0])
    os.close(child_ends[1])
    return pid


def _spawn_init(ctx: InitContext, child_ends: tuple[int, int], parent_ends: tuple[int, int]) -> int:
    """Fork the init I directly, into the container's pid namespace: P's children go
    there only for this fork (unshare/setns CLONE_NEWPID), then P points them back."""
    from vzkit.engines.container import syscalls as sc
    from vzkit.engines.container.init import container_child

    ns = ctx.namespaces
    own = -1
    if "pid" in ns:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        path = ns["pid"]
        if path:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.CLONE_NEWPID)
            finally:
                os.close(fd)
        else:
            sc.unshare(sc.CLONE_NEWPID)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(parent_ends[0])
                os.close(parent_ends[1])
                if own >= 0:
                    os.close(own)
                container_child(ctx)
            finally:
                os._exit(1)
    finally:
        if own >= 0:
            sc.setns(own, sc.CLONE_NEWPID)
            os.close(own)
    os.close(child_ends[0])
    os.close(child_ends[1])
    return pid


def create(
    root: str,
    container_id: str,
    bundle: str,
    *,
    pid_file: str | None = None,
    console_socket: str | None = None,
    preserve_fds: int = 0,
    warn: Warn = _noop,
) -> State:
    """Create the container; its init waits on the exec fifo until start()."""
    oci.check_id(container_id)
    bundle = os.path.abspath(bundle)
    spec, rootfs, raw = oci.read_bundle(bundle)
    namespaces = oci.namespaces(spec)
    process: Json = spec["process"]
    linux: Json = spec.get("linux") or {}
    if process.get("terminal") and not console_socket:
        raise InvalidConfig(
            "process.terminal is true but no --console-socket was given",
            hint="pass --console-socket, or set process.terminal to false in config.json",
        )
    cdir = container_dir(root, container_id)
    try:
        os.mkdir(cdir, 0o711)
    except FileNotFoundError:
        os.makedirs(root, mode=0o700, exist_ok=True)
        try:
            os.mkdir(cdir, 0o711)
        except FileExistsError:
            raise _exists(container_id) from None
    except FileExistsError:
        raise _exists(container_id) from None
    undo = _Undo()
    undo.push(lambda: remove_tree(cdir))
    try:
        return _create(
            undo, root, cdir, container_id, bundle, spec, raw, rootfs, namespaces, process,
            linux, pid_file, console_socket, preserve_fds, warn,
        )  # fmt: skip
    except BaseException:
        undo.run()
        raise


def _exists(container_id: str) -> Conflict:
    return Conflict(
        f"container {container_id!r} already exists",
        hint=f"pick another id, or `vz-runtime delete {container_id}` first",
    )


#: Under the state root: compiled seccomp programs (a dot name: `list` skips it).
SECCOMP_CACHE = ".cache/seccomp"


def seccomp_program(root: str, spec: Json) -> tuple[bytes | None, int]:
    """linux.seccomp as a BPF program and its seccomp(2) flags; (None, 0) without one.

    Compiling a profile with libseccomp costs ~1-2 ms, loading a compiled program ~0.05
    ms, and an engine runs the same profile for every container: programs are cached in
    files under the (root-only) state directory, keyed by the profile, the machine and
    the kernel (libseccomp adapts the program to the kernel's seccomp API level). A bad
    entry is recompiled and replaced; a cache that cannot be written only costs time.
    """
    cfg = (spec.get("linux") or {}).get("seccomp")
    if not cfg:
        return None, 0
    from vzkit.engines.container.syscalls import SECCOMP_FILTER_FLAGS

    flags = sum(SECCOMP_FILTER_FLAGS.get(f, 0) for f in set(cfg.get("flags") or []))
    uname = os.uname()
    key = f"{uname.machine}\0{uname.release}\0{json.dumps(cfg)}".encode()
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - Python 3.12 renamed it
        from hashlib import sha256
    cache = os.path.join(root, SECCOMP_CACHE)
    path = os.path.join(cache, sha256(key).hexdigest() + ".bpf")
    try:
        with open(path, "rb") as f:
            prog = f.read()
        if prog and len(prog) % 8 == 0:
            return prog, flags
    except OSError:
        pass
    from vzkit.engines.container import seccomp

    prog = seccomp.compile_bpf(cfg)
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        write_atomic(path, prog, unique=True)
    except OSError:
        pass
    return prog, flags


def _create(
    undo: _Undo,
    root: str,
    cdir: str,
    container_id: str,
    bundle: str,
    spec: Json,
    raw: bytes,
    rootfs: str,
    namespaces: dict[str, str | None],
    process: Json,
    linux: Json,
    pid_file: str | None,
    console_socket: str | None,
    preserve_fds: int,
    warn: Warn,
) -> State:
    from vzkit.engines.container import cgroup
    from vzkit.engines.container.init import InitContext, Pipe, preload

    # The bundle's own bytes: state.config() parses them to the same spec.
    write_atomic(os.path.join(cdir, CONFIG_FILE), raw)

    cg_path = cgroup_path(spec, container_id)
    limits = limits_from_resources(linux.get("resources") or {})
    group = cgroup.create(cg_path, limits)

    def destroy_cgroup() -> None:
        if not cgroup.remove(group.dirs):
            full = _open_cgroup_path(cg_path)
            if full is not None:
                full.kill()
                full.destroy()

    undo.push(destroy_cgroup)
    freezer = group.freezer_file()
    data: Json = {
        "id": container_id,
        "pid": 0,
        "bundle": bundle,
        "rootfs": rootfs,
        "annotations": spec.get("annotations") or {},
        "created_at": _now(),
        "created": False,
        "owner": os.geteuid(),
        "cgroupPath": cg_path,
        "cgroupProcs": group.procs_files(),
        "freezer": freezer,
        "limits": limits,
        "hooks": bool(spec.get("hooks")),
    }
    st = State(cdir, container_id, data)
    bpf, bpf_flags = seccomp_program(root, spec)

    fifo = os.path.join(cdir, FIFO)
    os.mkfifo(fifo, 0o622)
    if "user" in namespaces:
        # The init reopens the fifo as the user namespace's root, which is not the host
        # owner: as runc, let others write it (mkfifo's mode was cut by the umask).
        os.chmod(fifo, 0o622)
    fifo_fd = os.open(fifo, os.O_PATH | os.O_CLOEXEC)
    undo.push(lambda: os.close(fifo_fd))
    console_fd = -1
    if console_socket and process.get("terminal"):
        from vzkit.engines.container import console

        console_fd = console.connect(console_socket)
        undo.push(lambda: os.close(console_fd))

    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    undo.push(lambda: os.close(c2p_r))
    undo.push(lambda: os.close(p2c_w))
    ctx = InitContext(
        spec=spec,
        process=process,
        rootfs=rootfs,
        namespaces=namespaces,
        procs_files=st.procs_files(),
        pipe=Pipe(p2c_r, c2p_w),
        fifo_fd=fifo_fd,
        console_fd=console_fd,
        preserve_fds=preserve_fds,
        seccomp_bpf=bpf,
        seccomp_flags=bpf_flags,
    )
    hooks: Json = spec.get("hooks") or {}
    pre = list(hooks.get("prestart") or []) + list(hooks.get("createRuntime") or [])
    pid = 0

    def got_pid(new_pid: int) -> None:
        nonlocal pid
        pid = new_pid
        info = proc_start_time(pid)
        data["pid"] = pid
        data["startTime"] = info[0] if info else -1
        undo.push(lambda: _kill_and_reap(new_pid))
        if pre:
            from vzkit.engines.container.hooks import run_hooks

            st.save()  # `state` reports "creating" with the pid while the hooks run
            state_json = json.dumps(st.oci("creating")).encode()
            run_hooks("prestart", hooks.get("prestart"), state_json)
            run_hooks("createRuntime", hooks.get("createRuntime"), state_json)
            os.write(p2c_w, b"1")

    middle_pid = 0
    if "user" in namespaces or "time" in namespaces:
        middle_pid = _spawn(ctx, (p2c_r, c2p_w), (c2p_r, p2c_w))

        def reap_middle() -> None:
            if middle_pid:
                os.kill(middle_pid, 9)
                os.waitpid(middle_pid, 0)

        undo.push(reap_middle)
    else:
        preload(ctx)
        got_pid(_spawn_init(ctx, (p2c_r, c2p_w), (c2p_r, p2c_w)))
    reader = _Reader(c2p_r)
    while True:
        msg = reader.next()
        if msg is None:
            raise EngineError(
                "the container init exited during set-up without saying why",
                hint="rerun with --debug and check the runtime log",
            )
        kind = msg.get("type")
        if kind == "error":
            raise EngineError(str(msg.get("msg")), hint=msg.get("hint"))
        if kind == "userns":
            _write_maps(middle_pid, linux)
            os.write(p2c_w, b"1")
        elif kind == "pid":
            os.waitpid(middle_pid, 0)
            middle_pid = 0
            got_pid(int(msg["pid"]))
        elif kind == "hook":
            from vzkit.engines.container.hooks import run_hooks

            state_json = json.dumps(st.oci("creating")).encode()
            run_hooks("createContainer", hooks.get("createContainer"), state_json, ns_pid=pid)
            os.write(p2c_w, b"1")
        elif kind == "state":
            # For the startContainer hooks, which run in the init when it is started.
            os.write(p2c_w, json.dumps(st.oci("created")).encode() + b"\n")
        elif kind == "ready":
            break
    data["created"] = True
    st.save()
    if pid_file:
        write_atomic(os.path.abspath(pid_file), str(data["pid"]).encode())
    undo.steps.clear()
    os.close(fifo_fd)
    os.close(c2p_r)
    os.close(p2c_w)
    if console_fd >= 0:
        os.close(console_fd)
    return st


def _open_cgroup_path(path: str) -> Any:
    from vzkit.host import cgroups

    return cgroups.detect().open(path)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    _wait_dead(pid)


def _wait_dead(pid: int, start_time: int | None = None) -> None:
    """Wait until ``pid`` is gone (reaping it if it is our child, e.g. under run)."""
    info = proc_start_time(pid)
    st_time = start_time if start_time is not None else (info[0] if info else -1)
    deadline = time.monotonic() + _DEATH_TIMEOUT_S
    delay = 0.0002
    while alive(pid, st_time):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            raise EngineError(f"process {pid} did not exit after SIGKILL")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---------------------------------------------------------------------------- start


def start(root: str, container_id: str, *, warn: Warn = _noop) -> State:
    st = load(root, container_id)
    status = st.status()
    if status != "created":
        raise StateError(
            f"cannot start container {container_id!r}: it is {status}",
            hint="only a created container can be started; use run to create and start",
        )
    _start(st, _stored_hooks(st), warn)
    return st


def _start(st: State, hooks: Json, warn: Warn) -> None:
    fd = os.open(st.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _await_init(fd, st)
    finally:
        os.close(fd)
    os.unlink(st.fifo)
    if hooks.get("poststart"):
        _warn_hooks("poststart", hooks["poststart"], st, warn)


def _await_init(fd: int, st: State) -> None:
    """Read the init's byte from the fifo: it opened the write side and is about to exec."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            if os.read(fd, 1):
                return
            # No writer yet (it is just waking up), or the init died.
            if not alive(st.pid, int(st.data.get("startTime", -1))):
                raise EngineError(f"container {st.id!r} init exited before it could start")
            time.sleep(0.0001)
        except BlockingIOError:
            import select

            select.select([fd], [], [], 0.1)
        if time.monotonic() > deadline:
            raise EngineError(f"container {st.id!r} init did not answer start in time")


def _stored_hooks(st: State) -> Json:
    if not st.data.get("hooks", True):
        return {}  # create recorded that config.json has none: skip parsing it
    try:
        hooks: Json = st.config().get("hooks") or {}
    except (OSError, ValueError):
        return {}
    return hooks


def _warn_hooks(kind: str, hooks: list[Json], st: State, warn: Warn) -> None:
    from vzkit.engines.container.hooks import run_hooks

    state_json = json.dumps(st.oci()).encode()
    for hook in hooks:
        # runtime-spec: a failing poststart/poststop hook is logged and the rest go on.
        try:
            run_hooks(kind, [hook], state_json)
        except EngineError as exc:
            warn(exc.message)


# ---------------------------------------------------------------------------- kill / delete


_SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7,
    "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14,
    "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21,
    "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28,
    "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31,
}  # fmt: skip


def parse_signal(text: str) -> int:
    """KILL, SIGKILL, 9 (and RTMIN+n) -> the number."""
    name = text.strip().upper()
    if name.isdigit():
        num = int(name)
        if 0 < num < 65:
            return num
    name = name.removeprefix("SIG")
    if name in _SIGNALS:
        return _SIGNALS[name]
    if name.startswith("RTMIN"):
        off = name[5:].lstrip("+") or "0"
        if off.isdigit():
            return 34 + int(off)
    raise InvalidConfig(f"unknown signal {text!r}", hint="use a name like TERM or KILL, or 1-64")


def kill(root: str, container_id: str, sig: int, *, all_: bool = False) -> None:
    st = load(root, container_id)
    status = st.status()
    if status == "stopped":
        raise StateError(f"cannot kill container {container_id!r}: it is stopped")
    if all_:
        for pid in st.cgroup_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return
    try:
        os.kill(st.pid, sig)
    except ProcessLookupError:
        raise StateError(f"cannot kill container {container_id!r}: it is stopped") from None


def delete(root: str, container_id: str, *, force: bool = False, warn: Warn = _noop) -> None:
    try:
        st = load(root, container_id)
    except NotFound:
        if not force:
            raise
        # As runc: forcing the delete of what is already gone succeeds (podman relies on it
        # after a failed create); a corrupt leftover directory is removed.
        remove_tree(container_dir(root, container_id))
        return
    status = st.status()
    if status in ("running", "paused") and not force:
        raise StateError(
            f"cannot delete container {container_id!r}: it is {status}",
            hint="stop it first (kill), or use delete --force",
        )
    _delete(st, status, _stored_hooks(st), warn)


def _delete(st: State, status: str, hooks: Json, warn: Warn) -> None:
    state_json = json.dumps(st.oci("stopped")).encode() if hooks.get("poststop") else b""
    if status != "stopped" and st.pid:
        if status == "paused":
            # A frozen task dies only once thawed, and nothing else would thaw it.
            try:
                os.kill(st.pid, 9)
            except ProcessLookupError:
                pass
            _thaw(st)
        _kill_and_reap(st.pid)
    elif st.pid:
        # Under run, the init is our child: reap it so no zombie outlives us.
        try:
            os.waitpid(st.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    _remove_cgroup(st)
    remove_tree(st.cdir)
    for hook in hooks.get("poststop") or []:
        from vzkit.engines.container.hooks import run_hooks

        try:
            run_hooks("poststop", [hook], state_json)
        except EngineError as exc:
            warn(exc.message)


def _thaw(st: State) -> None:
    group = _open_cgroup(st)
    if group is not None:
        try:
            group.freeze(False)
        except VzError:
            pass


def _remove_cgroup(st: State) -> None:
    """rmdir the cgroup's directories; if one is busy (processes the init left, which
    the kernel kills with it but which may still be exiting) or has child cgroups, kill
    everything in it and remove the tree with the full driver."""
    from vzkit.engines.container import cgroup

    dirs = [os.path.dirname(p) for p in st.procs_files()]
    if dirs and cgroup.remove(dirs):
        return
    group = _open_cgroup(st)
    if group is not None:
        if group.pids():
            group.kill()
        group.destroy()


# ---------------------------------------------------------------------------- run


_FORWARDED = (1, 2, 3, 10, 12, 15, 28)  # HUP INT QUIT USR1 USR2 TERM WINCH


def wait_child(pid: int) -> int:
    """Wait for our child ``pid`` while forwarding signals to it; shell-style exit code."""
    # _signal, not signal: the wrapper's enums (enum, functools, collections) cost ~4 ms.
    import _signal  # type: ignore[import-not-found,unused-ignore]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in _FORWARDED:
        _signal.signal(s, forward)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run(
    root: str,
    container_id: str,
    bundle: str,
    *,
    pid_file: str | None = None,
    console_socket: str | None = None,
    detach: bool = False,
    keep: bool = False,
    preserve_fds: int = 0,
    warn: Warn = _noop,
) -> int:
    """create + start + wait + delete in one process; returns the process' exit code."""
    from vzkit.engines.container import syscalls as sc

    if not detach:
        # Processes the init leaves behind (and the init itself when a middle process
        # forked it) are re-parented to us: as subreaper we can wait for them.
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    st = create(
        root,
        container_id,
        bundle,
        pid_file=pid_file,
        console_socket=console_socket,
        preserve_fds=preserve_fds,
        warn=warn,
    )
    # The state and the config are the ones create just wrote: no need to read them back.
    hooks = _stored_hooks(st)
    try:
        _start(st, hooks, warn)
    except BaseException:
        delete(root, container_id, force=True, warn=warn)
        raise
    if detach:
        return 0
    try:
        code = wait_child(st.pid)
    finally:
        if not keep:
            # Stopped once wait_child has reaped the init; anything else if interrupted.
            _delete(st, st.status(), hooks, warn)
    return code


# ---------------------------------------------------------------------------- exec


def exec_process(
    root: str,
    container_id: str,
    process: Json,
    *,
    console_socket: str | None = None,
    pid_file: str | None = None,
    detach: bool = False,
    preserve_fds: int = 0,
) -> int:
    """Run ``process`` (an OCI process object) in the container; its exit code."""
    from vzkit.engines.container import syscalls as sc
    from vzkit.engines.container.init import InitContext, Pipe

    st = load(root, container_id)
    status = st.status()
    if status not in ("running", "created"):
        raise StateError(f"cannot exec in container {container_id!r}: it is {status}")
    spec = st.config()
    if not process.get("args"):
        raise InvalidConfig("exec needs a command", hint="vz-runtime exec ID -- CMD ARGS")
    console_fd = -1
    if process.get("terminal"):
        if not console_socket:
            raise InvalidConfig(
                "--tty needs --console-socket", hint="the pty master is sent to that socket"
            )
        from vzkit.engines.container import console

        console_fd = console.connect(console_socket)
    if not detach:
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    bpf, bpf_flags = seccomp_program(root, spec)
    ctx = InitContext(
        spec=spec,
        process=process,
        rootfs="/",
        namespaces={},
        procs_files=st.procs_files(),
        pipe=Pipe(p2c_r, c2p_w),
        console_fd=console_fd,
        preserve_fds=preserve_fds,
        join_pid=st.pid,
        seccomp_bpf=bpf,
        seccomp_flags=bpf_flags,
    )
    middle_pid = _spawn(ctx, (p2c_r, c2p_w), (c2p_r, p2c_w))
    if console_fd >= 0:
        os.close(console_fd)
    reader = _Reader(c2p_r)
    pid = 0
    failed = True
    try:
        while True:
            msg = reader.next()
            if msg is None:
                break  # the process exec'd: its copy of the pipe closed on exec
            if msg.get("type") == "error":
                raise EngineError(str(msg.get("msg")), hint=msg.get("hint"))
            if msg.get("type") == "pid":
                pid = int(msg["pid"])
                os.waitpid(middle_pid, 0)
                middle_pid = 0
        failed = False
    finally:
        if middle_pid:
            os.waitpid(middle_pid, 0)
        os.close(c2p_r)
        os.close(p2c_w)
        if failed and pid:
            _kill_and_reap(pid)
    if not pid:
        raise EngineError("exec: the helper process exited without starting the command")
    if pid_file:
        write_atomic(os.path.abspath(pid_file), str(pid).encode())
    if detach:
        return 0
    return wait_child(pid)


def exec_process_from(
    st_config: Json,
    *,
    args: list[str],
    tty: bool,
    console_size: tuple[int, int] | None = None,
    cwd: str | None,
    env: list[str],
    user: str | None,
    no_new_privs: bool,
    caps_add: list[str],
) -> Json:
    """The process for exec: the container's own process settings with these overrides."""
    base: Json = dict(st_config.get("process") or {})
    process: Json = {
        "terminal": tty,
        "args": args,
        "env": list(base.get("env") or []),
        "cwd": cwd or base.get("cwd") or "/",
        "user": dict(base.get("user") or {"uid": 0, "gid": 0}),
        "capabilities": json.loads(json.dumps(base.get("capabilities")))
        if base.get("capabilities") is not None
        else None,
        "noNewPrivileges": bool(base.get("noNewPrivileges")) or no_new_privs,
        "rlimits": base.get("rlimits") or [],
    }
    if tty and console_size:
        process["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
    if env:
        # Later values win, as in a shell's environment.
        keys = {e.split("=", 1)[0] for e in env}
        process["env"] = [e for e in process["env"] if e.split("=", 1)[0] not in keys] + env
    if user:
        uid, _, gid = user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise InvalidConfig(f"invalid --user {user!r}", hint="use UID[:GID]") from None
    if caps_add and process["capabilities"] is not None:
        for key in ("bounding", "effective", "permitted"):
            have = process["capabilities"].setdefault(key, [])
            have.extend(c for c in caps_add if c not in have)
    if process["capabilities"] is None:
        del process["capabilities"]
    return process


# ---------------------------------------------------------------------------- pause / update


def pause(root: str, container_id: str, frozen: bool = True) -> None:
    st = load(root, container_id)
    status = st.status()
    want = "running" if frozen else "paused"
    if status != want:
        verb = "pause" if frozen else "resume"
        raise StateError(f"cannot {verb} container {container_id!r}: it is {status}")
    group = _open_cgroup(st)
    if group is None:
        raise EngineError(f"the cgroup of container {container_id!r} is gone")
    group.freeze(frozen)
    if frozen:
        # v1 reports FREEZING until every task has stopped.
        deadline = time.monotonic() + 2.0
        while not st.frozen() and time.monotonic() < deadline:
            time.sleep(0.002)
        if not st.frozen():
            group.freeze(False)
            raise EngineError(f"container {container_id!r} did not freeze in time")


def update(root: str, container_id: str, resources: Json) -> Json:
    """Apply OCI linux.resources live; returns the resulting CgroupLimits fields."""
    from vzkit.host import cgroups

    st = load(root, container_id)
    status = st.status()
    if status == "stopped":
        raise StateError(f"cannot update container {container_id!r}: it is stopped")
    group = _open_cgroup(st)
    if group is None:
        raise EngineError(f"the cgroup of container {container_id!r} is gone")
    limits = limits_from_resources(resources, st.data.get("limits") or {})
    group.update(cgroups.CgroupLimits(**limits))
    st.data["limits"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in limits.items()}
    st.save()
    return limits


def ps(root: str, container_id: str) -> list[int]:
    return load(root, container_id).cgroup_pids()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
