"""The OCI lifecycle's core: create, start, run (create + start + wait + delete) and the
removal of what create made. kill, delete, pause, update and ps are in control.py, exec in
execute.py. Library code: raises the runtime's errors, never prints or exits.
"""

from __future__ import annotations

import time

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime import spec as oci
from vzkit_runtime.errors import Conflict, EngineError, HostUnsupported, InvalidConfig, StateError
from vzkit_runtime.state import (
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

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable

    from vzkit_runtime.init import InitContext
    from vzkit_runtime.spec import Json

    Warn = Callable[[str], None]

_START_TIMEOUT_S = 10.0
_DEATH_TIMEOUT_S = 5.0


def noop(_msg: str) -> None:
    pass


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


class Reader:
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


def spawn(ctx: InitContext, child_ends: tuple[int, int], parent_ends: tuple[int, int]) -> int:
    """Fork the middle process M (user/time namespaces, exec)."""
    from vzkit_runtime.init import middle

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
    from vzkit_runtime import syscalls as sc
    from vzkit_runtime.init import container_child

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
    warn: Warn = noop,
) -> State:
    """Create the container; its init waits on the exec fifo until start()."""
    oci.check_id(container_id)
    bundle = os.path.abspath(bundle)
    spec, rootfs, raw = oci.read_bundle(bundle)
    namespaces = oci.namespaces(spec)
    process: Json = spec["process"]
    linux: Json = spec.get("linux") or {}
    if "mount" not in namespaces:
        ignored = oci.without_mount_ns_ignored(spec)
        if ignored:
            warn(f"no mount namespace: the container shares the runtime's mounts, so "
                 f"{', '.join(ignored)} do nothing")  # fmt: skip
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
    from vzkit_runtime.syscalls import SECCOMP_FILTER_FLAGS

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
    from vzkit_runtime import seccomp

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
    from vzkit_runtime.init import InitContext, Pipe

    # The bundle's own bytes: state.config() parses them to the same spec.
    write_atomic(os.path.join(cdir, CONFIG_FILE), raw)
    st = State(cdir, container_id, _make_cgroup(undo, spec, container_id, warn))
    st.data.update(
        bundle=bundle,
        rootfs=rootfs,
        annotations=spec.get("annotations") or {},
        created_at=_now(),
        owner=os.geteuid(),
        hooks=bool(spec.get("hooks")),
    )
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
        from vzkit_runtime import console

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
    _Setup(undo, st, spec, ctx, (c2p_r, p2c_w)).run()
    st.data["created"] = True
    st.save()
    if pid_file:
        write_atomic(os.path.abspath(pid_file), str(st.pid).encode())
    undo.steps.clear()
    for fd in (fifo_fd, c2p_r, p2c_w, console_fd):
        if fd >= 0:
            os.close(fd)
    return st


def _make_cgroup(undo: _Undo, spec: Json, container_id: str, warn: Warn) -> Json:
    """The container's cgroup with its resources and device rules; the state it starts."""
    from vzkit_runtime import cgroups, devices

    path = cgroup_path(spec, container_id)
    resources = (spec.get("linux") or {}).get("resources") or {}
    group = cgroups.create(path, resources, devices.rules(spec), warn=warn)

    def destroy() -> None:
        if not cgroups.remove(group):
            cgroups.destroy(group)

    undo.push(destroy)
    return {
        "id": container_id,
        "pid": 0,
        "created": False,
        "cgroupPath": path,
        **group.record(),
        # What `update` merges into (devices are set once, at create).
        "resources": {k: v for k, v in resources.items() if k != "devices"},
    }


class _Setup:
    """P's side of the children's set-up: fork them, answer their requests (user
    namespace maps, hooks, the state) until the init reports ready."""

    def __init__(
        self, undo: _Undo, st: State, spec: Json, ctx: InitContext, ends: tuple[int, int]
    ) -> None:
        self.undo = undo
        self.st = st
        self.spec = spec
        self.ctx = ctx
        self.rfd, self.wfd = ends
        self.hooks: Json = spec.get("hooks") or {}
        self.middle_pid = 0

    def run(self) -> None:
        from vzkit_runtime.init import preload

        ctx, child_ends = self.ctx, (self.ctx.pipe.rfd, self.ctx.pipe.wfd)
        if "user" in ctx.namespaces or "time" in ctx.namespaces:
            self.middle_pid = spawn(ctx, child_ends, (self.rfd, self.wfd))
            self.undo.push(self._reap_middle)
        else:
            preload(ctx)
            self._got_pid(_spawn_init(ctx, child_ends, (self.rfd, self.wfd)))
        reader = Reader(self.rfd)
        while True:
            msg = reader.next()
            if msg is None:
                raise EngineError(
                    "the container init exited during set-up without saying why",
                    hint="rerun with --debug and check the runtime log",
                )
            kind = str(msg.get("type"))
            if kind == "error":
                raise EngineError(str(msg.get("msg")), hint=msg.get("hint"))
            if kind == "ready":
                return
            self._answer(kind, msg)

    def _answer(self, kind: str, msg: Json) -> None:
        st = self.st
        if kind == "userns":
            _write_maps(self.middle_pid, self.spec.get("linux") or {})
            os.write(self.wfd, b"1")
        elif kind == "pid":
            os.waitpid(self.middle_pid, 0)
            self.middle_pid = 0
            self._got_pid(int(msg["pid"]))
        elif kind == "hook":
            from vzkit_runtime.hooks import run_hooks

            state_json = json.dumps(st.oci("creating")).encode()
            hooks = self.hooks.get("createContainer")
            run_hooks("createContainer", hooks, state_json, ns_pid=st.pid)
            os.write(self.wfd, b"1")
        elif kind == "state":
            # For the startContainer hooks, which run in the init when it is started.
            os.write(self.wfd, json.dumps(st.oci("created")).encode() + b"\n")

    def _got_pid(self, pid: int) -> None:
        info = proc_start_time(pid)
        self.st.data["pid"] = pid
        self.st.data["startTime"] = info[0] if info else -1
        self.undo.push(lambda: kill_and_reap(pid))
        hooks = self.hooks
        if hooks.get("prestart") or hooks.get("createRuntime"):
            from vzkit_runtime.hooks import run_hooks

            self.st.save()  # `state` reports "creating" with the pid while the hooks run
            state_json = json.dumps(self.st.oci("creating")).encode()
            run_hooks("prestart", hooks.get("prestart"), state_json)
            run_hooks("createRuntime", hooks.get("createRuntime"), state_json)
            os.write(self.wfd, b"1")

    def _reap_middle(self) -> None:
        if self.middle_pid:
            os.kill(self.middle_pid, 9)
            os.waitpid(self.middle_pid, 0)


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    wait_dead(pid)


def wait_dead(pid: int, start_time: int | None = None) -> None:
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


def start(root: str, container_id: str, *, warn: Warn = noop) -> State:
    st = load(root, container_id)
    status = st.status()
    if status != "created":
        raise StateError(
            f"cannot start container {container_id!r}: it is {status}",
            hint="only a created container can be started; use run to create and start",
        )
    _start(st, stored_hooks(st), warn)
    return st


def _start(st: State, hooks: Json, warn: Warn) -> None:
    hooks_s = 0.0
    if hooks.get("startContainer"):
        from vzkit_runtime.hooks import timeout_of

        # The init runs them between our open and its byte.
        hooks_s = sum(timeout_of(h) for h in hooks["startContainer"])
    fd = os.open(st.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _await_init(fd, st, _START_TIMEOUT_S + hooks_s)
    finally:
        os.close(fd)
    os.unlink(st.fifo)
    if hooks.get("poststart"):
        warn_hooks("poststart", hooks["poststart"], st, warn)


def _await_init(fd: int, st: State, timeout: float) -> None:
    """Read the init's byte from the fifo: it opened the write side and is about to exec.

    select() wakes us when the byte arrives (a fifo nobody has opened for writing yet
    does not count as readable), so there is no polling; the timeout is only for
    noticing an init that died before it opened its end."""
    import select

    deadline = time.monotonic() + timeout
    while True:
        data = None
        if select.select([fd], [], [], 0.05)[0]:
            try:
                data = os.read(fd, 1)
            except BlockingIOError:
                pass
            if data:
                return
        if not alive(st.pid, int(st.data.get("startTime", -1))):
            raise EngineError(f"container {st.id!r} init exited before it could start")
        if time.monotonic() > deadline:
            raise EngineError(f"container {st.id!r} init did not answer start in time")
        if data == b"":
            time.sleep(0.001)  # a writer came and went without a word: not the init


def stored_hooks(st: State) -> Json:
    if not st.data.get("hooks", True):
        return {}  # create recorded that config.json has none: skip parsing it
    try:
        hooks: Json = st.config().get("hooks") or {}
    except (OSError, ValueError):
        return {}
    return hooks


def warn_hooks(kind: str, hooks: list[Json], st: State, warn: Warn) -> None:
    from vzkit_runtime.hooks import run_hooks

    state_json = json.dumps(st.oci()).encode()
    for hook in hooks:
        # runtime-spec: a failing poststart/poststop hook is logged and the rest go on.
        try:
            run_hooks(kind, [hook], state_json)
        except EngineError as exc:
            warn(exc.message)


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
    warn: Warn = noop,
) -> int:
    """create + start + wait + delete in one process; returns the process' exit code."""
    from vzkit_runtime import syscalls as sc

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
    hooks = stored_hooks(st)
    try:
        _start(st, hooks, warn)
    except BaseException:
        remove(st, st.status(), hooks, warn)
        raise
    if detach:
        return 0
    try:
        code = wait_child(st.pid)
    finally:
        if not keep:
            # Stopped once wait_child has reaped the init; anything else if interrupted.
            remove(st, st.status(), hooks, warn)
    return code


def remove(st: State, status: str, hooks: Json, warn: Warn) -> None:
    """Kill what still runs, remove the cgroup and the state, run the poststop hooks."""
    from vzkit_runtime import cgroups

    state_json = json.dumps(st.oci("stopped")).encode() if hooks.get("poststop") else b""
    group = cgroups.Cgroup.from_record(st.data)
    if status != "stopped" and st.pid:
        if group is not None:
            # Frozen while signalled (a paused container included), then thawed to die.
            cgroups.kill_all(group)
        kill_and_reap(st.pid)
    elif st.pid:
        # Under run, the init is our child: reap it so no zombie outlives us.
        try:
            os.waitpid(st.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    # rmdir alone on the fast path; processes the init left (the kernel kills them with
    # it, but they may still be exiting) or child cgroups need the full removal.
    if group is not None and not cgroups.remove(group):
        cgroups.destroy(group)
    remove_tree(st.cdir)
    for hook in hooks.get("poststop") or []:
        from vzkit_runtime.hooks import run_hooks

        try:
            run_hooks("poststop", [hook], state_json)
        except EngineError as exc:
            warn(exc.message)
