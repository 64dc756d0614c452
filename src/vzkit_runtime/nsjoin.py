"""Work done inside a running container's namespaces, by a forked child of the runtime.

The runtime itself stays in the host's namespaces: once in a container's user namespace
a process can never return to the host's mount namespace, where --log files, imports and
the error report live; and a multi-threaded caller (the daemon) cannot setns(CLONE_NEWNS)
at all, while this single-threaded one can. :func:`in_container` forks a child that joins
the namespaces of the container's init and runs the work there; an error it raises comes
back over a pipe as JSON and is raised again, as the same class, in the runtime.

After the mount namespace is joined, the child's root and cwd are the container's ``/``:
every path it opens resolves as in the container, symlinks and ``..`` included, and
cannot lead back to the host.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import EngineError, StateError, VzRuntimeError
from vzkit_runtime.state import load

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable
    from typing import Any

    from vzkit_runtime.state import State

#: The statuses whose init has its namespaces and its pivoted root.
LIVE = ("created", "running", "paused")


def live(root: str, container_id: str, verb: str) -> State:
    """The container's state; StateError unless it is created, running or paused."""
    st = load(root, container_id)
    status = st.status()
    if status not in LIVE:
        raise StateError(
            f"cannot {verb} container {container_id!r}: it is {status}",
            hint="the container must be live: created, running or paused",
        )
    return st


def in_container(st: State, work: Callable[[], None], kinds: tuple[str, ...] | None = None) -> None:
    """Run ``work`` in a forked child joined to the init's namespaces (all of them, or
    ``kinds``: user first, mount last), its cwd the container's ``/``."""
    from vzkit_runtime import syscalls as sc
    from vzkit_runtime.init import join_all

    sc.libc()  # loaded here: after setns the host's libc.so is out of reach
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(rfd)
            _join(st, join_all, sc, kinds)
            os.chdir("/")
            work()
            code = 0
        except BaseException as exc:
            report(wfd, exc)
        finally:
            os._exit(code)
    os.close(wfd)
    data = b""
    try:
        while chunk := os.read(rfd, 65536):
            data += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if data:
        raise VzRuntimeError.from_dict(json.loads(data))
    if status:
        raise EngineError(
            f"the helper joined to container {st.id!r} failed without saying why "
            f"(exit status {os.waitstatus_to_exitcode(status)})",
            hint="rerun with --debug",
        )


# No imports from here on in the child: the host's Python library is out of reach.


def _join(st: State, join_all: Callable[..., None], sc: Any, kinds: tuple[str, ...] | None) -> None:
    try:
        if kinds is None:
            join_all(st.pid, sc)
        else:
            join_all(st.pid, sc, kinds)
    except FileNotFoundError:
        raise StateError(f"container {st.id!r} stopped", hint="its init exited meanwhile") from None
    except sc.SyscallError as exc:
        raise EngineError(
            f"join the namespaces of container {st.id!r}: {exc.message}", hint=exc.hint
        ) from None


def report(wfd: int, exc: BaseException) -> None:
    """Send ``exc`` to the runtime as one JSON object (VzRuntimeError.to_dict)."""
    if isinstance(exc, VzRuntimeError):
        err = exc
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        err = EngineError(f"{exc.strerror or exc}{where}")
    else:
        err = EngineError(f"{type(exc).__name__}: {exc}")
    try:
        os.write(wfd, json.dumps(err.to_dict()).encode())
    except OSError:
        pass
