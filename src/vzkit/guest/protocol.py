"""The vzkit guest agent wire protocol, version 1, revision 2 (see agent/PROTOCOL.md).

Pure data: constants, frame encoding with a resynchronising decoder, and one codec per
payload type. No I/O happens here, so both ends (the host client, and fake agents in
tests) share exactly one definition of the bytes on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vzkit.errors import AgentError

# The virtio-serial port name the agent looks for in /sys/class/virtio-ports.
AGENT_PORT_NAME = "org.vzkit.agent"
MAGIC = 0x565A  # "VZ"
VERSION = 1
HEADER = struct.Struct(">HBBII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
# Child output and file data are sent in chunks of at most this many bytes.
CHUNK = 64 * 1024

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_MAGIC_BYTES = struct.pack(">HB", MAGIC, VERSION)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")


class MsgType(IntEnum):
    HELLO = 0x01
    EXEC = 0x10
    STARTED = 0x11
    STDIN = 0x12
    STDOUT = 0x13
    STDERR = 0x14
    EXIT = 0x15
    SIGNAL = 0x16
    RESIZE = 0x17
    ERROR = 0x1F
    FILE_PUT = 0x20
    FILE_GET = 0x21
    DATA = 0x22
    OK = 0x24
    POWEROFF = 0x30
    FSFREEZE = 0x40
    FSTHAW = 0x41


class ExecFlags(IntFlag):
    NONE = 0
    TTY = 0x1
    STDIN = 0x2


class Features(IntFlag):
    """HELLO.features: what an agent understands beyond revision 1."""

    NONE = 0
    FSFREEZE = 0x1


_KNOWN_FEATURES = Features.FSFREEZE


class PutFlags(IntFlag):
    NONE = 0
    PARENTS = 0x1


class ProtocolError(AgentError):
    """Bytes that do not follow the agent protocol."""


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes = b""


def encode_frame(type: int, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(
            f"frame payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
            hint="split the data into several frames",
        )
    if not 0 <= stream <= 0xFFFFFFFF:
        raise ProtocolError(f"stream id {stream} does not fit in 32 bits")
    return HEADER.pack(MAGIC, VERSION, type, stream, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed it bytes, get whole frames back.

    A header with a bad magic, version or length is skipped one byte at a time until a
    valid header appears; ``garbage`` counts the bytes dropped that way.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.garbage = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        return list(self._frames())

    def _frames(self) -> Iterator[Frame]:
        buf = self._buf
        off = 0
        try:
            while len(buf) - off >= HEADER_SIZE:
                magic, version, type_, stream, length = HEADER.unpack_from(buf, off)
                if magic != MAGIC or version != VERSION or length > MAX_PAYLOAD:
                    # Jump to the next plausible header start rather than byte by byte.
                    nxt = buf.find(_MAGIC_BYTES, off + 1)
                    skip_to = nxt if nxt >= 0 else max(off + 1, len(buf) - 2)
                    self.garbage += skip_to - off
                    off = skip_to
                    continue
                end = off + HEADER_SIZE + length
                if len(buf) < end:
                    break
                payload = bytes(buf[off + HEADER_SIZE : end])
                off = end
                yield Frame(type_, stream, payload)
        finally:
            del buf[:off]

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------------------------------
# Payload primitives


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> _Writer:
        self.parts.append(bytes((v,)))
        return self

    def u16(self, v: int) -> _Writer:
        self.parts.append(_U16.pack(v))
        return self

    def u32(self, v: int) -> _Writer:
        self.parts.append(_U32.pack(v))
        return self

    def i32(self, v: int) -> _Writer:
        self.parts.append(_I32.pack(v))
        return self

    def u64(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">Q", v))
        return self

    def string(self, v: str | bytes) -> _Writer:
        b = v.encode() if isinstance(v, str) else v
        self.parts.append(_U32.pack(len(b)) + b)
        return self

    def strlist(self, items: Iterable[str | bytes]) -> _Writer:
        items = list(items)
        self.u32(len(items))
        for item in items:
            self.string(item)
        return self

    def build(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.off = 0
        self.what = what

    def _take(self, n: int) -> bytes:
        if len(self.data) - self.off < n:
            raise ProtocolError(f"truncated {self.what} payload")
        b = self.data[self.off : self.off + n]
        self.off += n
        return b

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def raw_str(self) -> bytes:
        return self._take(self.u32())

    def string(self) -> str:
        return self.raw_str().decode("utf-8", "replace")

    def strlist(self) -> list[str]:
        return [self.string() for _ in range(self.u32())]

    def end(self) -> None:
        if self.off != len(self.data):
            extra = len(self.data) - self.off
            raise ProtocolError(f"{extra} trailing bytes in {self.what} payload")


# ---------------------------------------------------------------------------------------
# Payloads


@dataclass(frozen=True)
class Hello:
    proto_version: int
    agent_version: str
    kernel_release: str
    features: Features = Features.NONE

    def encode(self) -> bytes:
        w = _Writer().u16(self.proto_version).string(self.agent_version).string(self.kernel_release)
        return w.u32(int(self.features)).build()

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        r = _Reader(data, "HELLO")
        version, agent, kernel = r.u16(), r.string(), r.string()
        # Revision 1 agents stop here; a later revision may append more: ignore it.
        features = r.u32() if len(data) - r.off >= 4 else 0
        # Bits this host does not know stay out: the host asks only for what it knows.
        return cls(version, agent, kernel, Features(features & _KNOWN_FEATURES))


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    env: Sequence[str] = ()
    cwd: str = ""
    flags: ExecFlags = ExecFlags.NONE
    timeout_ms: int = 0
    rows: int = 24
    cols: int = 80

    def encode(self) -> bytes:
        w = _Writer().u32(int(self.flags)).u32(self.timeout_ms).u16(self.rows).u16(self.cols)
        return w.strlist(self.argv).strlist(self.env).string(self.cwd).build()

    @classmethod
    def decode(cls, data: bytes) -> ExecRequest:
        r = _Reader(data, "EXEC")
        flags, timeout, rows, cols = r.u32(), r.u32(), r.u16(), r.u16()
        argv, env, cwd = r.strlist(), r.strlist(), r.string()
        r.end()
        return cls(tuple(argv), tuple(env), cwd, ExecFlags(flags), timeout, rows, cols)


@dataclass(frozen=True)
class Started:
    pid: int

    def encode(self) -> bytes:
        return _I32.pack(self.pid)

    @classmethod
    def decode(cls, data: bytes) -> Started:
        r = _Reader(data, "STARTED")
        pid = r.i32()
        r.end()
        return cls(pid)


@dataclass(frozen=True)
class Exit:
    exit_code: int
    signal: int = 0
    timed_out: bool = False

    def encode(self) -> bytes:
        return _Writer().i32(self.exit_code).i32(self.signal).u8(int(self.timed_out)).build()

    @classmethod
    def decode(cls, data: bytes) -> Exit:
        r = _Reader(data, "EXIT")
        code, sig, timed_out = r.i32(), r.i32(), r.u8()
        r.end()
        return cls(code, sig, bool(timed_out))


@dataclass(frozen=True)
class Error:
    errno: int
    message: str

    def encode(self) -> bytes:
        return _Writer().i32(self.errno).string(self.message).build()

    @classmethod
    def decode(cls, data: bytes) -> Error:
        r = _Reader(data, "ERROR")
        err, msg = r.i32(), r.string()
        r.end()
        return cls(err, msg)


@dataclass(frozen=True)
class Signal:
    signum: int

    def encode(self) -> bytes:
        return _I32.pack(self.signum)

    @classmethod
    def decode(cls, data: bytes) -> Signal:
        r = _Reader(data, "SIGNAL")
        sig = r.i32()
        r.end()
        return cls(sig)


@dataclass(frozen=True)
class Resize:
    rows: int
    cols: int

    def encode(self) -> bytes:
        return _Writer().u16(self.rows).u16(self.cols).build()

    @classmethod
    def decode(cls, data: bytes) -> Resize:
        r = _Reader(data, "RESIZE")
        rows, cols = r.u16(), r.u16()
        r.end()
        return cls(rows, cols)


@dataclass(frozen=True)
class FilePut:
    path: str
    mode: int = 0o644
    flags: PutFlags = PutFlags.NONE

    def encode(self) -> bytes:
        return _Writer().u32(self.mode).u8(int(self.flags)).string(self.path).build()

    @classmethod
    def decode(cls, data: bytes) -> FilePut:
        r = _Reader(data, "FILE_PUT")
        mode, flags, path = r.u32(), r.u8(), r.string()
        r.end()
        return cls(path, mode, PutFlags(flags))


@dataclass(frozen=True)
class FileGet:
    path: str

    def encode(self) -> bytes:
        return _Writer().string(self.path).build()

    @classmethod
    def decode(cls, data: bytes) -> FileGet:
        r = _Reader(data, "FILE_GET")
        path = r.string()
        r.end()
        return cls(path)


@dataclass(frozen=True)
class FileInfo:
    """The OK reply to FILE_GET."""

    mode: int
    size: int

    def encode(self) -> bytes:
        return _Writer().u32(self.mode).u64(self.size).build()

    @classmethod
    def decode(cls, data: bytes) -> FileInfo:
        r = _Reader(data, "FILE_GET reply")
        mode, size = r.u32(), r.u64()
        r.end()
        return cls(mode, size)


@dataclass(frozen=True)
class Poweroff:
    reboot: bool = False

    def encode(self) -> bytes:
        return bytes((int(self.reboot),))

    @classmethod
    def decode(cls, data: bytes) -> Poweroff:
        r = _Reader(data, "POWEROFF")
        mode = r.u8()
        r.end()
        if mode > 1:
            raise ProtocolError(f"unknown POWEROFF mode {mode}")
        return cls(bool(mode))


@dataclass(frozen=True)
class FsFreeze:
    """FSFREEZE: the agent thaws by itself after ``timeout_ms`` (0: its default)."""

    timeout_ms: int = 0

    def encode(self) -> bytes:
        return _U32.pack(self.timeout_ms)

    @classmethod
    def decode(cls, data: bytes) -> FsFreeze:
        r = _Reader(data, "FSFREEZE")
        ms = r.u32()
        r.end()
        return cls(ms)


@dataclass(frozen=True)
class FsFrozen:
    """The OK reply to FSFREEZE: the mount points frozen, in freeze order."""

    mountpoints: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _Writer().strlist(self.mountpoints).build()

    @classmethod
    def decode(cls, data: bytes) -> FsFrozen:
        r = _Reader(data, "FSFREEZE reply")
        mounts = r.strlist()
        r.end()
        return cls(tuple(mounts))


@dataclass(frozen=True)
class FsThawed:
    """The OK reply to FSTHAW: how many file systems were thawed."""

    count: int = 0

    def encode(self) -> bytes:
        return _U32.pack(self.count)

    @classmethod
    def decode(cls, data: bytes) -> FsThawed:
        r = _Reader(data, "FSTHAW reply")
        count = r.u32()
        r.end()
        return cls(count)


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    """Split ``data`` into pieces of at most ``size`` bytes (none for empty data)."""
    if not 0 < size <= MAX_PAYLOAD:
        raise ValueError(f"chunk size must be in 1..{MAX_PAYLOAD}")
    return [data[i : i + size] for i in range(0, len(data), size)]


__all__ = [
    "CHUNK",
    "DEFAULT_PATH",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "VERSION",
    "Error",
    "ExecFlags",
    "ExecRequest",
    "Exit",
    "Features",
    "FileGet",
    "FileInfo",
    "FilePut",
    "Frame",
    "FrameDecoder",
    "FsFreeze",
    "FsFrozen",
    "FsThawed",
    "Hello",
    "MsgType",
    "Poweroff",
    "ProtocolError",
    "PutFlags",
    "Resize",
    "Signal",
    "Started",
    "chunks",
    "encode_frame",
]
