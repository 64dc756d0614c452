from __future__ import annotations

import pytest

from vzkit.errors import AgentError
from vzkit.guest.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
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


def test_header_layout() -> None:
    frame = encode_frame(MsgType.EXEC, 0x01020304, b"abc")
    assert frame == b"VZ\x01\x10\x01\x02\x03\x04\x00\x00\x00\x03abc"
    assert HEADER_SIZE == 12


@pytest.mark.parametrize(
    "payload",
    [
        Hello(1, "1.0.0", "6.1.0-18-cloud-amd64"),
        ExecRequest(
            ("sh", "-c", "echo hi"), ("A=1", "B=\xe9"), "/tmp", ExecFlags.TTY, 1500, 30, 100
        ),
        ExecRequest(("true",)),
        Started(4242),
        Exit(137, 9, True),
        Exit(-1, 0, False),
        Error(2, "cannot execute nope: No such file or directory"),
        Signal(15),
        Resize(40, 132),
        FilePut("/etc/x y", 0o4755, PutFlags.PARENTS),
        FileGet("/etc/hostname"),
        FileInfo(0o644, 5 * 1024**3),
        Poweroff(reboot=True),
        Hello(1, "1.1.0", "6.1.0", Features.FSFREEZE),
        FsFreeze(60_000),
        FsFrozen(("/mnt/data", "/")),
        FsFrozen(),
        FsThawed(2),
    ],
)
def test_payload_round_trip(payload: object) -> None:
    encoded = payload.encode()  # type: ignore[attr-defined]
    assert type(payload).decode(encoded) == payload  # type: ignore[attr-defined]


def test_hello_of_a_revision_1_agent_has_no_features() -> None:
    # A 1.0.0 agent's HELLO ends after kernel_release: no freeze to ask it for.
    old = Hello(1, "1.0.0", "6.1.0").encode()[: -len(b"\0\0\0\0")]
    assert Hello.decode(old) == Hello(1, "1.0.0", "6.1.0", Features.NONE)
    # Bits of later revisions are dropped (never asked for), trailing fields ignored.
    later = Hello(1, "9", "k").encode()[:-4] + b"\xff\xff\xff\xff" + b"more"
    assert Hello.decode(later).features == Features.FSFREEZE


def test_exec_encoding_is_exact() -> None:
    req = ExecRequest(("ls",), (), "", ExecFlags.STDIN, 0, 24, 80)
    assert req.encode() == (
        b"\x00\x00\x00\x02"  # flags
        b"\x00\x00\x00\x00"  # timeout
        b"\x00\x18\x00\x50"  # rows, cols
        b"\x00\x00\x00\x01\x00\x00\x00\x02ls"  # argv
        b"\x00\x00\x00\x00"  # env
        b"\x00\x00\x00\x00"  # cwd
    )


def test_file_info_size_is_u64() -> None:
    assert FileInfo(0o600, 2**40 + 5).encode() == b"\x00\x00\x01\x80" + (2**40 + 5).to_bytes(
        8, "big"
    )


def test_truncated_and_trailing_payloads_rejected() -> None:
    data = Exit(1).encode()
    with pytest.raises(ProtocolError, match="truncated"):
        Exit.decode(data[:-1])
    with pytest.raises(ProtocolError, match="trailing"):
        Exit.decode(data + b"\0")
    with pytest.raises(ProtocolError):
        Poweroff.decode(b"\x07")


def test_protocol_error_is_an_agent_error() -> None:
    assert issubclass(ProtocolError, AgentError)


def test_decoder_byte_by_byte() -> None:
    frames = [
        encode_frame(MsgType.STDOUT, 7, bytes(range(256))),
        encode_frame(MsgType.EXIT, 7, Exit(0).encode()),
        encode_frame(MsgType.OK, 9),
    ]
    dec = FrameDecoder()
    out: list[Frame] = []
    for b in b"".join(frames):
        out += dec.feed(bytes([b]))
    assert out == [
        Frame(MsgType.STDOUT, 7, bytes(range(256))),
        Frame(MsgType.EXIT, 7, Exit(0).encode()),
        Frame(MsgType.OK, 9, b""),
    ]
    assert dec.garbage == 0
    assert dec.buffered == 0


def test_decoder_resyncs_after_garbage() -> None:
    dec = FrameDecoder()
    hello = encode_frame(MsgType.HELLO, 0, Hello(1, "x", "y").encode())
    garbage = b"\x00\xffVZ\x02junk from a previous boot VZ"
    out = dec.feed(garbage + hello + b"more garbage!" + encode_frame(MsgType.OK, 3))
    assert out == [Frame(MsgType.HELLO, 0, Hello(1, "x", "y").encode()), Frame(MsgType.OK, 3)]
    assert dec.garbage == len(garbage) + len(b"more garbage!")


def test_decoder_resync_across_feeds() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"noise" * 10 + b"V") == []
    assert dec.feed(b"Z") == []
    # The "VZ" that began in earlier feeds is kept and completed by this one.
    assert dec.feed(encode_frame(MsgType.DATA, 1, b"abc")[2:]) == [Frame(MsgType.DATA, 1, b"abc")]
    dec2 = FrameDecoder()
    frame = encode_frame(MsgType.DATA, 1, b"abc")
    assert dec2.feed(b"garbage" + frame[:2]) == []
    assert dec2.feed(frame[2:]) == [Frame(MsgType.DATA, 1, b"abc")]


def test_oversize_frames_rejected() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(MsgType.DATA, 1, b"\0" * (MAX_PAYLOAD + 1))
    assert len(encode_frame(MsgType.DATA, 1, b"\0" * MAX_PAYLOAD)) == HEADER_SIZE + MAX_PAYLOAD
    # A header announcing more than the maximum is garbage, not a reason to buffer 4 GiB.
    dec = FrameDecoder()
    bad = b"VZ\x01\x22\x00\x00\x00\x01\xff\xff\xff\xff"
    good = encode_frame(MsgType.OK, 2)
    assert dec.feed(bad + good) == [Frame(MsgType.OK, 2)]
    assert dec.garbage == len(bad)


def test_unknown_version_is_skipped() -> None:
    dec = FrameDecoder()
    v2 = b"VZ\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00"
    assert dec.feed(v2 + encode_frame(MsgType.HELLO, 0)) == [Frame(MsgType.HELLO, 0)]


def test_chunks() -> None:
    assert chunks(b"") == []
    assert chunks(b"abcde", 2) == [b"ab", b"cd", b"e"]
    with pytest.raises(ValueError):
        chunks(b"x", MAX_PAYLOAD + 1)
