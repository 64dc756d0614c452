"""OCI hooks: run each with the container state on stdin, bounded by its timeout.

fork + execve by hand rather than subprocess: subprocess costs milliseconds of imports
on every runtime call, and the createContainer hooks must join the container's
namespaces between fork and exec, which subprocess cannot do.
"""

from __future__ import annotations

import time

from vzkit_runtime import _os as os
from vzkit_runtime.errors import EngineError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any

DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.005

# Namespaces a createContainer hook joins, mount last (it changes what paths mean).
_CONTAINER_NS = ("ipc", "uts", "net", "cgroup", "mnt")


def run_hooks(
    kind: str,
    hooks: list[dict[str, Any]] | None,
    state: bytes,
    *,
    ns_pid: int | None = None,
) -> None:
    """Run ``hooks`` in order; the first failure raises EngineError naming the hook.

    ``ns_pid``: run inside that process' namespaces (createContainer, startContainer run
    by the runtime). The hook binary is opened before joining, so its path resolves in
    the runtime's mount namespace as runtime-spec requires.
    """
    for hook in hooks or []:
        _run_one(kind, hook, state, ns_pid)


def timeout_of(hook: dict[str, Any]) -> float:
    return float(hook.get("timeout") or DEFAULT_TIMEOUT_S)


def _run_one(kind: str, hook: dict[str, Any], state: bytes, ns_pid: int | None) -> None:
    path = str(hook["path"])
    args = [str(a) for a in hook.get("args") or [path]]
    env = [str(e) for e in hook.get("env") or []]
    timeout = timeout_of(hook)
    what = f"{kind} hook {path}"
    try:
        exe = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise EngineError(
            f"{what}: {exc.strerror}", hint="hook paths must exist on the host"
        ) from None
    ns_fds: list[tuple[str, int]] = []
    r, w = os.pipe()
    try:
        if ns_pid is not None:
            for name in _CONTAINER_NS:
                with_path = f"/proc/{ns_pid}/ns/{name}"
                if os.readlink(with_path) != os.readlink(f"/proc/self/ns/{name}"):
                    ns_fds.append((name, os.open(with_path, os.O_RDONLY | os.O_CLOEXEC)))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs or exits
            _child(exe, r, args, env, ns_fds)
    finally:
        os.close(r)
        for _, fd in ns_fds:
            os.close(fd)
    os.close(exe)
    try:
        os.write(w, state)
    except BrokenPipeError:
        pass  # the hook need not read its stdin
    finally:
        os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, 9)  # SIGKILL (the signal module costs ms to import)
            os.waitpid(pid, 0)
            raise EngineError(
                f"{what} timed out after {timeout:g} s", hint="raise the hook's timeout"
            )
        time.sleep(_POLL_S)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise EngineError(f"{what} {how}")


def _child(
    exe: int, stdin: int, args: list[str], env: list[str], ns: list[tuple[str, int]]
) -> None:
    try:
        from vzkit_runtime import syscalls

        for _name, fd in ns:
            syscalls.setns(fd, 0)
        os.dup2(stdin, 0)
        os.set_inheritable(exe, True)  # fexecve of a #! script reads it via /dev/fd/N
        envd = dict(e.split("=", 1) for e in env if "=" in e)
        os.execve(exe, args, envd)
    except BaseException as exc:
        os.write(2, f"hook: {exc}\n".encode())
    os._exit(127)
