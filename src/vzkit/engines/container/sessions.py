"""What a container engine hands out for a running container: exec sessions over
``vz-runtime exec`` (piped or on a terminal) and the console, which is its init's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vzkit.api.instances import ExecResult
from vzkit.errors import EngineError


class Timed:
    """Kills an exec's `vz-runtime exec` process when its timeout runs out."""

    proc: asyncio.subprocess.Process

    def _start_timer(self, timeout: float | None) -> None:
        self._timed_out = False
        self._timer = (
            asyncio.get_running_loop().call_later(timeout, self._timeout) if timeout else None
        )

    def _timeout(self) -> None:
        self._timed_out = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Proc(Timed):
    """An ExecSession over a `vz-runtime exec` child process."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        timeout: float | None,
        oom_kills: Callable[[], int] | None = None,
    ) -> None:
        self.proc = proc
        # Read before and after: a SIGKILL with a new OOM kill in between was the OOM killer.
        self._oom_kills = oom_kills
        self._oom_before = oom_kills() if oom_kills else 0
        self._queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(64)
        self._open = 2
        self._chunks = 0
        self._pumps = [
            asyncio.create_task(self._pump(proc.stdout, 1)),
            asyncio.create_task(self._pump(proc.stderr, 2)),
        ]
        self._ender = asyncio.create_task(self._end_output_after_exit())
        self._start_timer(timeout)

    async def _pump(self, stream: asyncio.StreamReader | None, channel: int) -> None:
        assert stream is not None
        try:
            while data := await stream.read(65536):
                self._chunks += 1
                await self._queue.put((channel, data))
        finally:
            self._open -= 1
            if self._open == 0:
                self._queue.put_nowait(None)

    async def _end_output_after_exit(self) -> None:
        """End the output 200 ms after `vz-runtime exec` exits, as the guest agent does.

        A command that leaves a background child holding its stdout (``nc -l ... &``)
        would otherwise keep the session open for the child's life. asyncio's
        ``Process.wait()`` itself waits for the pipes to close, so the exit is seen through
        a pidfd of our own, and our ends of the pipes are closed to let ``wait()`` return.
        """
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        try:
            fd = os.pidfd_open(self.proc.pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            loop.add_reader(fd, on_exit)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        # Output still flowing (or waiting for a slow reader) is not a pipe left open.
        while True:
            seen = self._chunks
            _, pending = await asyncio.wait(self._pumps, timeout=0.2)
            if not pending:
                return
            if self._chunks == seen and self._queue.qsize() < self._queue.maxsize:
                break
        for pump in pending:
            pump.cancel()
        await asyncio.wait(pending)
        transport: Any = getattr(self.proc, "_transport", None)
        for channel in (1, 2):
            pipe = transport.get_pipe_transport(channel) if transport else None
            if pipe is not None:
                pipe.close()

    async def write_stdin(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    async def signal(self, signum: int) -> None:
        # vz-runtime exec forwards signals to the command it waits for.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    async def resize(self, rows: int, cols: int) -> None:
        raise EngineError("terminal resize is not supported for container exec yet")

    async def read(self) -> tuple[int, bytes] | None:
        return await self._queue.get()

    async def wait(self) -> ExecResult:
        await asyncio.gather(self._ender, *self._pumps, return_exceptions=True)
        code = await self.proc.wait()
        self._stop_timer()
        if code < 0:  # vz-runtime itself was killed (timeout)
            return ExecResult(exit_code=128 - code, signal=-code, timed_out=self._timed_out)
        sig = code - 128 if code > 128 else None
        error = None
        if sig == signal.SIGKILL and self._oom_kills and self._oom_kills() > self._oom_before:
            error = "killed by the out-of-memory killer: the container's memory limit was hit"
        return ExecResult(exit_code=code, signal=sig, timed_out=self._timed_out, error=error)


class TtyProc(Timed):
    """An ExecSession over `vz-runtime exec --tty`: the pty master came over a socket."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        master: int,
        reader: asyncio.StreamReader,
        timeout: float | None,
    ) -> None:
        self.proc = proc
        self.master = master
        self._reader = reader
        self._start_timer(timeout)

    async def write_stdin(self, data: bytes) -> None:
        # A terminal's input is small (keystrokes); a blocking write cannot stall for long.
        await asyncio.to_thread(_write_all, self.master, data)

    async def close_stdin(self) -> None:
        pass  # a terminal has no end of input: ^D is the user's to type

    async def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    async def resize(self, rows: int, cols: int) -> None:
        set_winsize(self.master, rows, cols)

    async def read(self) -> tuple[int, bytes] | None:
        try:
            data = await self._reader.read(65536)
        except OSError:  # EIO: every slave end is closed
            data = b""
        return (1, data) if data else None

    async def wait(self) -> ExecResult:
        code = await self.proc.wait()
        self._stop_timer()
        with contextlib.suppress(OSError):
            os.close(self.master)
        sig = code - 128 if code > 128 else (-code if code < 0 else None)
        return ExecResult(
            exit_code=code if code >= 0 else 128 - code, signal=sig, timed_out=self._timed_out
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class LogConsole:
    """A container has no serial port: its console is its init's output, followed live."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._f.seek(0, os.SEEK_END)

    async def read(self, n: int) -> bytes:
        while True:
            data = self._f.read(n)
            if data:
                return data
            await asyncio.sleep(0.2)

    async def write(self, data: bytes) -> None:
        pass  # nothing reads a container's console input

    async def close(self) -> None:
        self._f.close()


def receive_fd(server: socket.socket) -> int:
    """Accept the runtime's connection and take the pty master it sends (as runc does)."""
    server.settimeout(30)
    conn, _ = server.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
    if not fds:
        raise EngineError("vz-runtime sent no terminal")
    return fds[0]
