"""What runs in the forked children: the middle process and the container init (or an
exec'd process), up to execve.

Process tree of ``create``::

    vz-runtime create (P) --fork--> init (I, PID 1 of the new pid ns)

P points its children's pid namespace at the new one (unshare(CLONE_NEWPID), or setns
to a given path) just for that fork and then back. I joins the cgroup, creates or joins
the other namespaces (:func:`container_child`), builds the container and waits on the
exec fifo until ``start``. When P exits, I is reparented away from it: whoever called
create never owns the container.

With a user or time namespace (created before the others so it owns them, and the
time namespace, like the pid one, applies to children only), and for exec, a middle
process (M) sits between: P --fork--> M --fork--> I. M joins the cgroup and the
namespaces, reports I's pid and exits.

Children talk to P over a pipe of JSON lines ({"type": "pid"|"userns"|"hook"|"ready"|
"error", ...}); P answers on a second pipe with one byte per request. Nothing here
returns to the caller: every path ends in execve or os._exit.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import EngineError, InvalidConfig, VzRuntimeError
from vzkit_runtime.spec import DEFAULT_PATH

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any, NoReturn

    from vzkit_runtime.spec import Json

_NS_FILE = {"network": "net", "mount": "mnt"}
# setns order: user first (it grants the rights for the others), mount last (it changes
# what /proc paths mean for the ones after it).
_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


class Pipe:
    """The child's end: JSON lines out, one-byte answers in."""

    __slots__ = ("rfd", "wfd")

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd

    def send(self, msg: Json) -> None:
        os.write(self.wfd, json.dumps(msg).encode() + b"\n")

    def wait(self) -> None:
        if os.read(self.rfd, 1) != b"1":
            # P died or gave up: nothing to continue for.
            os._exit(1)

    def read_line(self) -> bytes:
        """One newline-terminated answer (P writes nothing unasked, so no over-read)."""
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                os._exit(1)  # P died or gave up
            buf += chunk
        return buf[:-1]

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1


class InitContext:
    """Everything the children need, captured before fork."""

    __slots__ = (
        "console_fd",
        "exec_mode",
        "fifo_fd",
        "join_pid",
        "namespaces",
        "pipe",
        "preserve_fds",
        "process",
        "procs_files",
        "rootfs",
        "seccomp_bpf",
        "seccomp_flags",
        "spec",
    )

    def __init__(
        self,
        *,
        spec: Json,
        process: Json,
        rootfs: str,
        namespaces: dict[str, str | None],
        procs_files: list[str],
        pipe: Pipe,
        fifo_fd: int = -1,
        console_fd: int = -1,
        preserve_fds: int = 0,
        join_pid: int = 0,
        seccomp_bpf: bytes | None = None,
        seccomp_flags: int = 0,
    ) -> None:
        self.spec = spec
        self.process = process
        self.rootfs = rootfs
        self.namespaces = namespaces
        self.procs_files = procs_files
        self.pipe = pipe
        self.fifo_fd = fifo_fd
        self.console_fd = console_fd
        self.preserve_fds = preserve_fds
        self.join_pid = join_pid
        self.exec_mode = join_pid > 0
        #: linux.seccomp compiled by P (runtime.seccomp_program); None: compile here.
        self.seccomp_bpf = seccomp_bpf
        self.seccomp_flags = seccomp_flags


class _Step:
    """The name of the step in progress, prefixed to any error the init reports."""

    name = "start"


def _fail(pipe: Pipe, exc: BaseException, step: str) -> NoReturn:
    if isinstance(exc, VzRuntimeError):
        msg, hint = exc.message, exc.hint
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        msg, hint = f"{exc.strerror or exc}{where}", None
    else:
        msg, hint = f"{type(exc).__name__}: {exc}", None
    try:
        pipe.send({"type": "error", "msg": f"{step}: {msg}", "hint": hint})
    except OSError:
        os.write(2, f"vz-runtime init: {step}: {msg}\n".encode())
    os._exit(1)


# ---------------------------------------------------------------------------- middle


def middle(ctx: InitContext) -> NoReturn:
    """M: cgroup, namespaces, fork the init, report its pid, exit."""
    from vzkit_runtime import syscalls as sc

    step = _Step()
    try:
        step.name = "set process.oomScoreAdj"
        set_oom_score_adj(ctx.process)
        step.name = "load modules"
        preload(ctx)
        step.name = "join cgroup"
        join_cgroup(ctx.procs_files)
        if ctx.exec_mode:
            join_all(ctx.join_pid, sc)
        else:
            _enter_namespaces(ctx, step, sc)
        step.name = "fork the container process"
        pid = os.fork()
        if pid == 0:
            if ctx.exec_mode:
                exec_process(ctx)
            container_init(ctx)
        ctx.pipe.send({"type": "pid", "pid": pid})
    except BaseException as exc:
        _fail(ctx.pipe, exc, step.name)
    os._exit(0)


def container_child(ctx: InitContext) -> NoReturn:
    """I forked straight from P (no user or time namespace): P has already pointed it at
    its pid namespace. Join the cgroup and the other namespaces, then build the container."""
    from vzkit_runtime import syscalls as sc

    step = _Step()
    try:
        step.name = "set process.oomScoreAdj"
        set_oom_score_adj(ctx.process)
        step.name = "join cgroup"
        join_cgroup(ctx.procs_files)
        _enter_namespaces(ctx, step, sc, skip=("pid",))
    except BaseException as exc:
        _fail(ctx.pipe, exc, step.name)
    container_init(ctx)


def set_oom_score_adj(process: Json) -> None:
    """process.oomScoreAdj, set while the host's /proc is still in view (the container's
    process and everything it forks inherit it)."""
    value = process.get("oomScoreAdj")
    if value is None:
        return
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(int(value)).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise EngineError(
            f"set process.oomScoreAdj to {value}: {exc.strerror}",
            hint="lowering an OOM score below the runtime's needs CAP_SYS_RESOURCE",
        ) from None


def join_cgroup(procs_files: list[str]) -> None:
    """Move this (single-threaded) process into the cgroup in every hierarchy.

    On v1, "0" goes to ``tasks``, not ``cgroup.procs``: moving only the calling thread
    lets the kernel skip the global threadgroup rwsem, whose write side waits for an RCU
    grace period (10-40 ms measured here, most of a container's start-up). With a single
    thread, moving the thread moves the process. v2 has no such file for domain cgroups.
    """
    for procs in procs_files:
        tasks = procs[: -len("cgroup.procs")] + "tasks"
        try:
            fd = os.open(tasks, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def preload(ctx: InitContext) -> None:
    """Import and load everything the child will need before it enters the container:
    after pivot_root (or setns into the mount namespace) the host's Python library,
    libc.so and libseccomp.so are out of reach. P calls it before forking I, M before
    forking an exec'd process."""
    from vzkit_runtime import caps, syscalls

    syscalls.libc()
    caps.last_cap()
    if (ctx.spec.get("linux") or {}).get("seccomp") and ctx.seccomp_bpf is None:
        from vzkit_runtime import seccomp

        seccomp._libseccomp()
    if ctx.process.get("terminal"):
        from vzkit_runtime import console  # noqa: F401
    if not ctx.exec_mode:
        from vzkit_runtime import mounts  # noqa: F401

        if (ctx.spec.get("hooks") or {}).get("startContainer"):
            from vzkit_runtime import hooks  # noqa: F401


def _enter_namespaces(ctx: InitContext, step: _Step, sc: Any, skip: tuple[str, ...] = ()) -> None:
    ns = {k: v for k, v in ctx.namespaces.items() if k not in skip}
    # Open every namespace to join before entering any: a path is a host path.
    join: list[tuple[str, int]] = []
    step.name = "open namespace paths"
    for kind in _JOIN_ORDER:
        path = ns.get(kind)
        if kind in ns and path:
            join.append((kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
    if "user" in ns:
        step.name = "user namespace"
        if ns["user"]:
            fd = join.pop(0)[1]
            sc.setns(fd, sc.NAMESPACES["user"])
            os.close(fd)
        else:
            sc.unshare(sc.NAMESPACES["user"])
            ctx.pipe.send({"type": "userns"})
            ctx.pipe.wait()
        # Become the namespace's root (when mapped) so the init starts with full caps there.
        try:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        except OSError as exc:
            raise EngineError(
                "become root in the user namespace: " + (exc.strerror or str(exc)),
                hint="map container uid/gid 0 in linux.uidMappings/gidMappings",
            ) from None
    for kind, fd in join:
        step.name = f"join {kind} namespace {ns[kind]}"
        sc.setns(fd, sc.NAMESPACES[kind])
        os.close(fd)
    flags = 0
    for kind, path in ns.items():
        if kind != "user" and not path:
            flags |= sc.NAMESPACES[kind]
    if flags:
        step.name = "create namespaces"
        sc.unshare(flags)


def join_all(pid: int, sc: Any, kinds: tuple[str, ...] = _JOIN_ORDER) -> None:
    """Join every namespace of ``pid`` (of ``kinds``) that differs from ours."""
    fds: list[tuple[str, int]] = []
    for kind in _JOIN_ORDER:
        if kind not in kinds:
            continue
        name = _NS_FILE.get(kind, kind)
        path = f"/proc/{pid}/ns/{name}"
        try:
            if os.readlink(path) == os.readlink(f"/proc/self/ns/{name}"):
                continue
            fds.append((kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
        except FileNotFoundError:
            if kind in ("time", "cgroup"):
                continue  # older kernels
            raise
    for kind, fd in fds:
        try:
            sc.setns(fd, sc.NAMESPACES[kind])
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- init


def container_init(ctx: InitContext) -> NoReturn:
    """I: build the container, wait for start, exec the process."""
    from vzkit_runtime import caps, mounts

    spec, process = ctx.spec, ctx.process
    step = _Step()
    pipe = ctx.pipe
    try:
        hooks = spec.get("hooks") or {}
        if hooks.get("prestart") or hooks.get("createRuntime"):
            step.name = "wait for createRuntime hooks"
            pipe.wait()
        os.setsid()
        ns = ctx.namespaces
        in_userns = "user" in ns
        step.name = "prepare rootfs"

        def create_container_hooks() -> None:
            # The runtime runs them joined to our namespaces while the host's files are
            # still visible: before pivot_root, as runtime-spec requires.
            step.name = "createContainer hooks"
            pipe.send({"type": "hook"})
            pipe.wait()
            step.name = "prepare rootfs"

        if "mount" in ns:
            mounts.prepare_rootfs(
                ctx.rootfs,
                spec,
                in_userns=in_userns,
                before_pivot=create_container_hooks if hooks.get("createContainer") else None,
            )
        elif hooks.get("createContainer"):
            create_container_hooks()
        # Without a mount namespace the container shares the runtime's (runtime-spec):
        # no rootfs, no pivot_root, nothing of the host's mounted over or unmounted.
        if process.get("terminal"):
            step.name = "set up the terminal"
            slave = _terminal(ctx)
            if "mount" in ns:
                mounts.mount_console(slave)
        hostname = spec.get("hostname")
        if hostname:
            step.name = f"set hostname {hostname!r}"
            if "uts" not in ns:
                raise InvalidConfig("hostname is set but there is no uts namespace")
            from vzkit_runtime import syscalls as sc

            sc.sethostname(hostname)
        exe = _prepare_process(ctx, step, caps)
        start_state = b"{}"
        if hooks.get("startContainer"):
            # The hooks get the container state on stdin, which only P knows (id, host pid).
            step.name = "fetch the state for startContainer hooks"
            pipe.send({"type": "state"})
            start_state = pipe.read_line()
        step.name = "report ready"
        pipe.send({"type": "ready"})
        pipe.close()
    except BaseException as exc:
        _fail(pipe, exc, step.name)
    try:
        # Blocks until `start` opens the fifo for reading. The O_PATH fd was opened before
        # pivot_root; /proc/self/fd reopens it in the container's mount namespace.
        fd = os.open(f"/proc/self/fd/{ctx.fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.close(ctx.fifo_fd)
        start_hooks = (spec.get("hooks") or {}).get("startContainer")
        if start_hooks:
            from vzkit_runtime.hooks import run_hooks

            run_hooks("startContainer", start_hooks, start_state)
        # The byte only after the startContainer hooks: `start` runs the poststart hooks
        # once it reads it, and runtime-spec orders those after the startContainer ones.
        os.write(fd, b"0")
        os.close(fd)
        _exec(ctx, exe)
    except BaseException as exc:
        msg = exc.message if isinstance(exc, VzRuntimeError) else str(exc)
        os.write(2, f"vz-runtime: start {process['args'][0]}: {msg}\n".encode())
        os._exit(127)


def exec_process(ctx: InitContext) -> NoReturn:
    """An exec'd process, already in the container's namespaces and cgroup."""
    from vzkit_runtime import caps

    step = _Step()
    try:
        os.setsid()
        if ctx.process.get("terminal"):
            step.name = "set up the terminal"
            _terminal(ctx)
        exe = _prepare_process(ctx, step, caps)
        step.name = f"exec {exe}"
        _exec(ctx, exe)
    except BaseException as exc:
        _fail(ctx.pipe, exc, step.name)


def _terminal(ctx: InitContext) -> str:
    from vzkit_runtime import console

    if ctx.console_fd < 0:
        raise InvalidConfig(
            "process.terminal is true but no --console-socket was given",
            hint="pass --console-socket, or set process.terminal to false",
        )
    return console.setup_pty(ctx.console_fd, ctx.process.get("consoleSize"))


def _prepare_process(ctx: InitContext, step: _Step, caps: Any) -> str:
    """rlimits, user, capabilities, no_new_privs, cwd, seccomp; returns the executable."""
    from vzkit_runtime import syscalls as sc

    process = ctx.process
    seccomp_cfg = (ctx.spec.get("linux") or {}).get("seccomp")
    nnp = bool(process.get("noNewPrivileges"))
    for rl in process.get("rlimits") or []:
        step.name = f"set rlimit {rl.get('type')}"
        set_rlimit(rl)
    if seccomp_cfg and not nnp:
        # Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: load it while the
        # init still has it (runc does the same).
        step.name = "load seccomp filter"
        _load_seccomp(ctx, seccomp_cfg)
    user = process.get("user") or {}
    uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
    groups = [int(g) for g in user.get("additionalGids") or []]
    if "umask" in user:
        os.umask(int(user["umask"]))
    step.name = f"set user {uid}:{gid}"
    if uid or gid or groups:
        caps.keep_caps_across_setuid()
    if _setgroups_allowed():
        os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    step.name = "apply capabilities"
    caps.apply_capabilities(process.get("capabilities"))
    if nnp:
        step.name = "set no_new_privileges"
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    cwd = process.get("cwd") or "/"
    step.name = f"chdir {cwd}"
    os.chdir(cwd)
    step.name = "find the executable"
    exe = find_executable(process["args"][0], _env(process).get("PATH", DEFAULT_PATH))
    if seccomp_cfg and nnp:
        step.name = "load seccomp filter"
        _load_seccomp(ctx, seccomp_cfg)
    return exe


def _load_seccomp(ctx: InitContext, cfg: Json) -> None:
    if ctx.seccomp_bpf is not None:
        from vzkit_runtime import syscalls as sc

        sc.seccomp_filter(ctx.seccomp_bpf, ctx.seccomp_flags)
        return
    from vzkit_runtime import seccomp

    seccomp.load_seccomp(cfg)


def _setgroups_allowed() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() != "deny"
    except OSError:
        return True


def _env(process: Json) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in process.get("env") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            env[key] = value
    return env


def _exec(ctx: InitContext, exe: str) -> NoReturn:
    keep = 3 + ctx.preserve_fds
    # Python's own fds are close-on-exec; ones inherited from our caller are not.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the fd listdir itself used is gone
                pass
    os.execve(exe, ctx.process["args"], _env(ctx.process))


def find_executable(name: str, path: str) -> str:
    if "/" in name:
        if os.access(name, os.X_OK):
            return name
        raise InvalidConfig(f"exec: {name!r}: no such executable in the container")
    for d in path.split(":"):
        cand = os.path.join(d or ".", name)
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            return cand
    raise InvalidConfig(
        f"exec: {name!r}: executable file not found in $PATH",
        hint="check process.args[0] and process.env PATH",
    )


def set_rlimit(rl: dict[str, Any]) -> None:
    from vzkit_runtime import syscalls as sc

    name = str(rl.get("type", ""))
    num = sc.RLIMITS.get(name)
    if num is None:
        raise InvalidConfig(f"unknown rlimit type {name!r}", hint="use names like RLIMIT_NOFILE")
    try:
        sc.setrlimit(num, int(rl.get("soft", 0)), int(rl.get("hard", 0)), name)
    except sc.SyscallError as exc:
        cur_hard = sc.getrlimit(num)[1]
        shown = "unlimited" if cur_hard == sc.RLIM_INFINITY else str(cur_hard)
        raise EngineError(
            f"setrlimit {name} soft={rl.get('soft')} hard={rl.get('hard')}: "
            f"{os.strerror(exc.errno)}",
            hint=(
                "raising a hard limit needs CAP_SYS_RESOURCE, which this host lacks; "
                f"keep the hard limit <= the current {shown}"
            ),
        ) from None
