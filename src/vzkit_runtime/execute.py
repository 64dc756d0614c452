"""exec: a process joined to a running container's namespaces and cgroup (through a
middle process, as create does with a user namespace), with the container's own
process settings unless overridden."""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import EngineError, InvalidConfig, StateError
from vzkit_runtime.runtime import Reader, kill_and_reap, seccomp_program, spawn, wait_child
from vzkit_runtime.state import load, write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from vzkit_runtime.spec import Json


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
    from vzkit_runtime import syscalls as sc
    from vzkit_runtime.init import InitContext, Pipe

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
        from vzkit_runtime import console

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
    middle_pid = spawn(ctx, (p2c_r, c2p_w), (c2p_r, p2c_w))
    if console_fd >= 0:
        os.close(console_fd)
    reader = Reader(c2p_r)
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
            kill_and_reap(pid)
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
    if base.get("oomScoreAdj") is not None:
        process["oomScoreAdj"] = base["oomScoreAdj"]
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
