"""Stream and terminal plumbing for the SDK's exec and console calls.

Private to vzkit.sdk.client: stdin feeding, raw-mode terminals and SIGWINCH forwarding.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from vzkit.sdk.transport import WebSocket

CHUNK = 64 * 1024

# -- stream helpers ---------------------------------------------------------------------------


def _known_size(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return st.st_size - f.tell()
    if hasattr(f, "getbuffer"):
        return len(f.getbuffer()) - f.tell()
    return None


def _feed_stdin(ws: WebSocket, src: bytes | BinaryIO) -> None:
    # Runs in its own thread so a command that does not read its input cannot deadlock output.
    try:
        if isinstance(src, bytes):
            for i in range(0, len(src), CHUNK):
                ws.send(b"\x00" + src[i : i + CHUNK])
        else:
            read = _reader(src)
            while chunk := read():
                ws.send(b"\x00" + chunk)
        ws.send(b"\x00")
    except Exception:
        pass  # the socket closed under us: the command is over, the main thread reports it


def _reader(src: BinaryIO) -> Callable[[], bytes]:
    # os.read returns what is there now, so interactive input is forwarded without buffering.
    try:
        fd = src.fileno()
    except (OSError, AttributeError, ValueError):
        return lambda: src.read(CHUNK)
    return lambda: os.read(fd, CHUNK)


class _FdSink:
    """Unbuffered writes straight to a file descriptor (the terminal, in raw mode)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def flush(self) -> None:
        pass


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except (OSError, ValueError):
        return 24, 80
    return max(size.lines, 1), max(size.columns, 1)


class _Terminal:
    """Raw mode on the local terminal plus a thread forwarding its input to a WebSocket.

    The SIGWINCH handler only pokes a pipe: sending from a signal handler could re-enter
    the WebSocket's locks held by the interrupted main thread.
    """

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.fd = sys.stdin.fileno()
        self._saved: list[Any] | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._old_winch: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Terminal:
        if self.raw and os.isatty(self.fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.write(self._wake_w, b"q")
        if self._thread is not None:
            self._thread.join(timeout=1)
        os.close(self._wake_w)
        if self._thread is None or not self._thread.is_alive():
            os.close(self._wake_r)

    def start_forwarding(
        self, ws: WebSocket, *, channel: bytes, resize: bool, detach: bytes | None = None
    ) -> None:
        if resize:
            import signal

            def on_winch(signum: int, frame: object) -> None:
                with suppress(OSError):
                    os.write(self._wake_w, b"r")

            with suppress(ValueError):  # only the main thread may set handlers
                self._old_winch = signal.signal(signal.SIGWINCH, on_winch)
            self._send_resize(ws)
        self._thread = threading.Thread(
            target=self._forward, args=(ws, channel, detach), name="vz-tty-in", daemon=True
        )
        self._thread.start()

    def _send_resize(self, ws: WebSocket) -> None:
        rows, cols = _terminal_size()
        ws.send(json.dumps({"resize": [rows, cols]}))

    def _forward(self, ws: WebSocket, channel: bytes, detach: bytes | None) -> None:
        import select

        try:
            while True:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    cmds = os.read(self._wake_r, 64)
                    if b"q" in cmds:
                        return
                    self._send_resize(ws)
                if self.fd in ready:
                    data = os.read(self.fd, CHUNK)
                    if not data:
                        if channel:
                            ws.send(channel)  # closes the command's stdin
                        return
                    if detach is not None and detach in data:
                        before = data[: data.index(detach)]
                        if before:
                            ws.send(channel + before)
                        ws.close()
                        return
                    ws.send(channel + data)
        except Exception:
            pass  # the session ended; the main thread reports the result
