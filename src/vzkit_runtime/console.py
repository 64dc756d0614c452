"""The container's terminal: a pty opened inside the container, master sent to a socket.

runc's protocol: the caller listens on a unix socket (``--console-socket``); the runtime
connects, and the init sends the pty master as SCM_RIGHTS ancillary data with the pty
name as the payload. The caller then owns the terminal; the runtime keeps nothing.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from vzkit_runtime import _os as os
from vzkit_runtime.errors import EngineError, InvalidConfig


def connect(path: str) -> int:
    """Connect to the console socket (in the runtime's mount namespace); returns its fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise InvalidConfig(
            f"cannot connect to console socket {path}: {exc.strerror}",
            hint="the caller must listen on the unix socket before create",
        ) from None
    return sock.detach()


def setup_pty(sock_fd: int, size: dict[str, int] | None = None) -> str:
    """In the init: open a pty, make its slave the controlling tty and stdio, send the
    master over ``sock_fd``. Returns the slave's path (for /dev/console).

    ``size`` is OCI's ``process.consoleSize``: set before the process runs, so its first
    look at the terminal already sees it (the caller's resize would come too late).
    """
    master, slave = os.openpty()
    name = os.ttyname(slave)
    if size:
        fcntl.ioctl(
            slave,
            termios.TIOCSWINSZ,
            struct.pack("HHHH", int(size.get("height", 0)), int(size.get("width", 0)), 0, 0),
        )
    try:
        # The init is a session leader (setsid) without a tty: this one becomes its own.
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    except OSError as exc:
        raise EngineError(f"make {name} the controlling terminal: {exc.strerror}") from None
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)
    sock = socket.socket(fileno=sock_fd)
    try:
        socket.send_fds(sock, [name.encode()], [master])
    except OSError as exc:
        raise EngineError(f"send the pty master over the console socket: {exc.strerror}") from None
    finally:
        sock.close()
        os.close(master)
    return name
