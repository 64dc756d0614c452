"""Host side of the guest agent protocol (vzkit.guest.protocol) over asyncio streams.

One reader task demultiplexes frames by stream id into per-stream bounded buffers;
writers share one lock so frames never interleave. A consumer that stops reading one
session's output eventually stalls the whole connection (the reader blocks on that
session's full buffer): read what you start, or close the session's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzkit.api.instances import ExecResult
from vzkit.errors import AgentError, InvalidConfig, NotFound, VzError
from vzkit.guest.protocol import (
    CHUNK,
    VERSION,
    Error,
    ExecFlags,
    ExecRequest,
    Exit,
    Features,
    FileGet,
    FileInfo,
    FilePut,
    Frame,
    FrameDecoder,
    FsFreeze,
    FsFrozen,
    FsThawed,
    Hello,
    MsgType,
    Poweroff,
    ProtocolError,
    PutFlags,
    Resize,
    Signal,
    Started,
    chunks,
    encode_frame,
)

__all__ = ["AgentClient", "AgentHello", "CompletedExec", "ExecSession"]

log = logging.getLogger(__name__)

STDOUT = 1
STDERR = 2

# Frames buffered per stream before the reader waits for the consumer.
_STREAM_BUFFER = 64
# Host-to-guest data frames: large enough to amortise the per-frame cost.
_SEND_CHUNK = 4 * CHUNK
_READ_SIZE = 256 * 1024
_HINT = "check that the guest is running and its agent is healthy (see the guest console log)"


@dataclass(frozen=True)
class AgentHello:
    proto_version: int
    agent_version: str
    kernel_release: str
    features: Features = Features.NONE


@dataclass(frozen=True)
class CompletedExec:
    stdout: bytes
    stderr: bytes
    result: ExecResult

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


class _Stream:
    """Bounded frame buffer of one stream, fed by the reader task."""

    def __init__(self, maxsize: int = _STREAM_BUFFER) -> None:
        self._frames: deque[Frame] = deque()
        self._max = maxsize
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._failure: str | None = None
        self._discard = False

    async def put(self, frame: Frame) -> None:
        while len(self._frames) >= self._max and self._failure is None and not self._discard:
            self._space.clear()
            await self._space.wait()
        if self._discard:
            return
        self._frames.append(frame)
        self._readable.set()

    async def get(self) -> Frame:
        while not self._frames:
            if self._failure is not None:
                raise AgentError(self._failure, hint=_HINT)
            self._readable.clear()
            await self._readable.wait()
        frame = self._frames.popleft()
        self._space.set()
        return frame

    def has_frames(self) -> bool:
        return bool(self._frames)

    def fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
        self._readable.set()
        self._space.set()

    def discard(self) -> None:
        """Drops what is buffered and anything that still arrives (the stream is abandoned)."""
        self._discard = True
        self._frames.clear()
        self._space.set()


def _error_exit_code(err: Error) -> int:
    # As Docker does: 127 when the command does not exist, 126 when it cannot be run.
    return 127 if err.errno == errno.ENOENT else 126


class ExecSession:
    """One command running in the guest."""

    def __init__(self, client: AgentClient, stream_id: int, stream: _Stream) -> None:
        self._client = client
        self._stream = stream
        self.stream_id = stream_id
        self.pid: int | None = None
        self._result: ExecResult | None = None

    def _finish(self, result: ExecResult) -> None:
        self._result = result
        self._client._unregister(self.stream_id)

    def _finish_error(self, err: Error) -> None:
        self._finish(ExecResult(exit_code=_error_exit_code(err), error=err.message))

    async def write_stdin(self, data: bytes) -> None:
        # An empty STDIN frame means EOF, so empty writes are simply not sent.
        for piece in chunks(bytes(data), _SEND_CHUNK):
            await self._client._send(MsgType.STDIN, self.stream_id, piece)

    async def close_stdin(self) -> None:
        await self._client._send(MsgType.STDIN, self.stream_id, b"")

    async def signal(self, signum: int) -> None:
        await self._client._send(MsgType.SIGNAL, self.stream_id, Signal(signum).encode())

    async def resize(self, rows: int, cols: int) -> None:
        await self._client._send(MsgType.RESIZE, self.stream_id, Resize(rows, cols).encode())

    async def read(self) -> tuple[int, bytes] | None:
        """Next piece of output as (1 = stdout | 2 = stderr, data); None once it is over."""
        while self._result is None:
            frame = await self._stream.get()
            if frame.type == MsgType.STDOUT:
                return STDOUT, frame.payload
            if frame.type == MsgType.STDERR:
                return STDERR, frame.payload
            if frame.type == MsgType.EXIT:
                ex = Exit.decode(frame.payload)
                self._finish(
                    ExecResult(
                        exit_code=ex.exit_code, signal=ex.signal or None, timed_out=ex.timed_out
                    )
                )
            elif frame.type == MsgType.ERROR:
                self._finish_error(Error.decode(frame.payload))
            else:
                log.warning("unexpected frame type %#x on exec stream %d", frame.type, frame.stream)
        return None

    async def wait(self) -> ExecResult:
        """Waits for the command to end, discarding output not read yet."""
        while await self.read() is not None:
            pass
        assert self._result is not None
        return self._result

    @property
    def result(self) -> ExecResult | None:
        return self._result


class AgentClient:
    """A connection to one guest agent."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        hello: AgentHello,
        pending: list[Frame],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self.hello = hello
        self.closed = False
        self._close_reason = "the connection to the guest agent is closed"
        self._streams: dict[int, _Stream] = {}
        # A fresh client starts at a random id: if the agent missed a quick disconnect and
        # reconnect, streams of the previous connection may still be alive there.
        self._next_id = secrets.randbelow(0xFFFFFFFF)
        self._write_lock = asyncio.Lock()
        # Set by every HELLO that arrives: ping() waits for the next one.
        self._hello_seen = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop(pending))

    # -- connecting ---------------------------------------------------------------------

    @classmethod
    async def connect_unix(cls, path: Path, *, timeout: float) -> AgentClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(path))
        except (OSError, TimeoutError) as exc:
            raise AgentError(
                f"cannot connect to the guest agent socket {path}: {exc or 'timed out'}",
                hint="check that the instance's QEMU process is running",
            ) from exc
        return await cls.open(reader, writer, timeout=max(0.0, deadline - loop.time()))

    @classmethod
    async def open(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float
    ) -> AgentClient:
        """Handshakes over the given streams; on failure the writer is closed."""
        decoder = FrameDecoder()
        try:
            async with asyncio.timeout(timeout):
                writer.write(encode_frame(MsgType.HELLO, 0))
                await writer.drain()
                while True:
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        raise AgentError(
                            "the guest agent closed the connection before saying hello",
                            hint=_HINT,
                        )
                    frames = decoder.feed(data)
                    for i, frame in enumerate(frames):
                        hello = _parse_hello(frame)
                        if hello is not None:
                            return cls(reader, writer, decoder, hello, frames[i + 1 :])
        except TimeoutError as exc:
            writer.close()
            raise AgentError(
                f"the guest agent did not say hello within {timeout:g} s", hint=_HINT
            ) from exc
        except OSError as exc:
            writer.close()
            raise AgentError(f"talking to the guest agent failed: {exc}", hint=_HINT) from exc
        except BaseException:
            writer.close()
            raise

    # -- plumbing -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise AgentError(self._close_reason, hint=_HINT)

    def _register(self) -> tuple[int, _Stream]:
        self._check_open()
        while True:
            # Ids only grow (modulo 2**32, skipping 0), so a stream the host abandoned is
            # never confused with a new one while the agent may still be sending on it.
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            if self._next_id not in self._streams:
                break
        stream = _Stream()
        self._streams[self._next_id] = stream
        return self._next_id, stream

    def _unregister(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.discard()

    async def _send(self, type: int, stream_id: int, payload: bytes = b"") -> None:
        self._check_open()
        frame = encode_frame(type, stream_id, payload)
        try:
            async with self._write_lock:
                self._writer.write(frame)
                await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            # RuntimeError: asyncio refuses writes on a transport that is closing.
            self._mark_closed(f"the connection to the guest agent was lost: {exc}")
            raise AgentError(self._close_reason, hint=_HINT) from exc

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._close_reason = reason
        for stream in self._streams.values():
            stream.fail(self._close_reason)
        self._streams.clear()

    async def _read_loop(self, pending: list[Frame]) -> None:
        reason = "the guest agent closed the connection"
        try:
            for frame in pending:
                await self._dispatch(frame)
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    await self._dispatch(frame)
        except (OSError, ProtocolError) as exc:
            reason = f"the connection to the guest agent was lost: {exc}"
        except asyncio.CancelledError:
            reason = "the agent client was closed"
            raise
        except Exception as exc:  # a bug here must still fail the sessions, not hang them
            log.exception("guest agent reader failed")
            reason = f"the guest agent reader failed: {exc!r}"
        finally:
            self._mark_closed(reason)

    async def _dispatch(self, frame: Frame) -> None:
        if frame.stream == 0:
            if frame.type == MsgType.HELLO:
                hello = _parse_hello(frame)
                if hello is not None:
                    # A restarted agent (maybe another version) says hello again.
                    self.hello = hello
                    self._hello_seen.set()
            elif frame.type == MsgType.ERROR:
                try:
                    err = Error.decode(frame.payload)
                    log.warning("guest agent protocol error: %s", err.message)
                except ProtocolError:
                    log.warning("guest agent sent a malformed ERROR frame")
            return
        stream = self._streams.get(frame.stream)
        if stream is not None:
            await stream.put(frame)

    # -- operations ---------------------------------------------------------------------

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> ExecSession:
        """Starts a command. A command that cannot start gives a finished session whose
        result carries the agent's message (exit 127 if not found, else 126)."""
        if not argv:
            raise AgentError("exec needs a command", hint="pass at least argv[0]")
        flags = ExecFlags.NONE
        if tty:
            flags |= ExecFlags.TTY
        if stdin:
            flags |= ExecFlags.STDIN
        if not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF):
            raise InvalidConfig(
                f"invalid terminal size {rows}x{cols}", hint="rows and cols must be 1..65535"
            )
        # 0 means "no timeout" on the wire, so a tiny timeout becomes 1 ms, not none.
        timeout_ms = 0 if timeout is None else min(0xFFFFFFFF, max(1, math.ceil(timeout * 1000)))
        request = ExecRequest(
            argv=tuple(argv),
            env=tuple(f"{k}={v}" for k, v in (env or {}).items()),
            cwd=cwd or "",
            flags=flags,
            timeout_ms=timeout_ms,
            rows=rows,
            cols=cols,
        )
        payload = request.encode()
        stream_id, stream = self._register()
        session = ExecSession(self, stream_id, stream)
        try:
            await self._send(MsgType.EXEC, stream_id, payload)
            first = await stream.get()
        except BaseException:
            self._unregister(stream_id)
            raise
        if first.type == MsgType.STARTED:
            session.pid = Started.decode(first.payload).pid
        elif first.type == MsgType.ERROR:
            session._finish_error(Error.decode(first.payload))
        else:
            self._unregister(stream_id)
            raise ProtocolError(f"the guest agent answered EXEC with frame type {first.type:#x}")
        return session

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> CompletedExec:
        """Runs a command to completion, collecting its output."""
        session = await self.exec(argv, env=env, cwd=cwd, stdin=input is not None, timeout=timeout)
        feeder: asyncio.Task[None] | None = None
        if input is not None and session.result is None:
            feeder = asyncio.create_task(_feed(session, input))
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            while (item := await session.read()) is not None:
                (out if item[0] == STDOUT else err).append(item[1])
            result = await session.wait()
        finally:
            if feeder is not None:
                # The command may end without reading all its input.
                feeder.cancel()
                await asyncio.wait([feeder])
        return CompletedExec(b"".join(out), b"".join(err), result)

    async def push_file(
        self,
        path: str,
        data: bytes | AsyncIterator[bytes],
        *,
        mode: int = 0o644,
        parents: bool = False,
    ) -> None:
        """Writes a file in the guest atomically (temporary file, then rename)."""
        flags = PutFlags.PARENTS if parents else PutFlags.NONE
        stream_id, stream = self._register()
        try:
            await self._send(MsgType.FILE_PUT, stream_id, FilePut(path, mode, flags).encode())
            async for piece in _pieces(data):
                if stream.has_frames():
                    break  # the agent already refused: stop sending, read why
                await self._send(MsgType.DATA, stream_id, piece)
            await self._send(MsgType.DATA, stream_id, b"")
            reply = await stream.get()
        finally:
            self._unregister(stream_id)
        if reply.type == MsgType.OK:
            return
        if reply.type == MsgType.ERROR:
            raise _file_error("write", path, Error.decode(reply.payload))
        raise ProtocolError(f"the guest agent answered FILE_PUT with frame type {reply.type:#x}")

    async def pull_file(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """Reads a file from the guest: (permission bits, chunks). Consume the chunks (or
        aclose() them) before starting many more operations."""
        stream_id, stream = self._register()
        try:
            await self._send(MsgType.FILE_GET, stream_id, FileGet(path).encode())
            first = await stream.get()
            if first.type == MsgType.ERROR:
                raise _file_error("read", path, Error.decode(first.payload))
            if first.type != MsgType.OK:
                raise ProtocolError(
                    f"the guest agent answered FILE_GET with frame type {first.type:#x}"
                )
            info = FileInfo.decode(first.payload)
        except BaseException:
            self._unregister(stream_id)
            raise
        return info.mode, self._file_chunks(stream_id, stream, path)

    async def _file_chunks(
        self, stream_id: int, stream: _Stream, path: str
    ) -> AsyncIterator[bytes]:
        try:
            while True:
                frame = await stream.get()
                if frame.type == MsgType.DATA:
                    if not frame.payload:
                        return
                    yield frame.payload
                elif frame.type == MsgType.ERROR:
                    raise _file_error("read", path, Error.decode(frame.payload))
                else:
                    raise ProtocolError(f"unexpected frame type {frame.type:#x} in a file transfer")
        finally:
            self._unregister(stream_id)

    async def poweroff(self, *, reboot: bool = False) -> None:
        """Asks the guest to power off (or reboot); returns once the agent agreed."""
        reply = await self._request(MsgType.POWEROFF, Poweroff(reboot).encode())
        if reply.type == MsgType.ERROR:
            err = Error.decode(reply.payload)
            raise AgentError(f"the guest refused to power off: {err.message}", hint=_HINT)

    async def ping(self, timeout: float) -> AgentHello:
        """A HELLO round trip: proves the agent is there and answering now (a guest's
        agent may have died or been replaced since the connection opened)."""
        self._hello_seen.clear()
        await self._send(MsgType.HELLO, 0)
        try:
            async with asyncio.timeout(timeout):
                await self._hello_seen.wait()
        except TimeoutError as exc:
            raise AgentError(
                f"the guest agent did not answer within {timeout:g} s", hint=_HINT
            ) from exc
        self._check_open()
        return self.hello

    async def fsfreeze(self, timeout_ms: int) -> tuple[str, ...]:
        """Freezes the guest's writable block-backed file systems (PROTOCOL.md); the
        agent thaws them by itself after ``timeout_ms``. Returns the mount points."""
        reply = await self._request(MsgType.FSFREEZE, FsFreeze(timeout_ms).encode())
        if reply.type == MsgType.ERROR:
            err = Error.decode(reply.payload)
            raise AgentError(
                f"the guest could not freeze its file systems: {err.message}",
                hint="see the guest's kernel log",
                errno=err.errno,
                agent_message=err.message,
            )
        return FsFrozen.decode(reply.payload).mountpoints

    async def fsthaw(self) -> int:
        """Thaws what fsfreeze froze; returns how many file systems were thawed."""
        reply = await self._request(MsgType.FSTHAW)
        if reply.type == MsgType.ERROR:
            err = Error.decode(reply.payload)
            raise AgentError(f"the guest could not thaw its file systems: {err.message}")
        return FsThawed.decode(reply.payload).count

    async def _request(self, type: MsgType, payload: bytes = b"") -> Frame:
        """One request on a fresh stream, answered by one OK or ERROR frame."""
        stream_id, stream = self._register()
        try:
            await self._send(type, stream_id, payload)
            reply = await stream.get()
        finally:
            self._unregister(stream_id)
        if reply.type not in (MsgType.OK, MsgType.ERROR):
            raise ProtocolError(
                f"the guest agent answered {type.name} with frame type {reply.type:#x}"
            )
        return reply

    async def close(self) -> None:
        """Closes the connection; pending sessions fail with AgentError."""
        self._reader_task.cancel()
        await asyncio.wait([self._reader_task])
        self._mark_closed("the agent client was closed")
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _parse_hello(frame: Frame) -> AgentHello | None:
    if frame.type != MsgType.HELLO or frame.stream != 0:
        return None
    try:
        h = Hello.decode(frame.payload)
    except ProtocolError:
        return None
    if h.proto_version != VERSION:
        log.warning("guest agent speaks protocol %d, expected %d", h.proto_version, VERSION)
    return AgentHello(h.proto_version, h.agent_version, h.kernel_release, h.features)


def _file_error(verb: str, path: str, err: Error) -> VzError:
    reason = os.strerror(err.errno) if err.errno > 0 else err.message
    hint = "check the path and its permissions inside the guest"
    if err.errno == errno.EBUSY:
        # The guest is frozen for a snapshot for a moment (PROTOCOL.md, FSFREEZE).
        reason, hint = "its file systems are frozen for a snapshot", "retry in a moment"
    # A path that is not there, or a directory given for a file, is the caller's mistake
    # (a 4xx), not the agent failing.
    kind: type[VzError] = {
        errno.ENOENT: NotFound,
        errno.ENOTDIR: NotFound,
        errno.EISDIR: InvalidConfig,
    }.get(err.errno, AgentError)
    return kind(
        f"cannot {verb} {path} in the guest: {reason}",
        hint=hint,
        errno=err.errno,
        agent_message=err.message,
    )


async def _pieces(data: bytes | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        for piece in chunks(bytes(data), _SEND_CHUNK):
            yield piece
        return
    async for block in data:
        for piece in chunks(bytes(block), _SEND_CHUNK):
            yield piece


async def _feed(session: ExecSession, data: bytes) -> None:
    try:
        await session.write_stdin(data)
        await session.close_stdin()
    except AgentError:
        pass  # the reader side reports a lost connection
