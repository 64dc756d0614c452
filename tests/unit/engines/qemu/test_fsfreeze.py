"""Quiescing around a live disk capture: the freeze, the thaw whatever happens, and the
crash-consistent fallback with its warning (a fake agent peer speaks the real protocol
to a real AgentClient; QMP is a recorder)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vzkit.api.instances import Instance, InstanceState, InstanceType, Limits
from vzkit.api.snapshots import SnapshotInfo
from vzkit.engines.qemu import fsfreeze
from vzkit.engines.qemu.agent import AgentClient
from vzkit.errors import AgentError
from vzkit.guest.protocol import (
    Error,
    Features,
    FrameDecoder,
    FsFreeze,
    FsFrozen,
    FsThawed,
    Hello,
    MsgType,
    encode_frame,
)
from vzkit.storage.snapshots import SnapshotStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeQmp:
    """Records commands; the VM starts paused, as the snapshot service leaves it."""

    def __init__(self) -> None:
        self.status = "paused"
        self.log: list[str] = []

    async def execute(self, cmd: str, args: Any = None) -> Any:
        self.log.append(cmd)
        if cmd == "cont":
            self.status = "running"
        elif cmd == "stop":
            self.status = "paused"
        return {"status": self.status} if cmd == "query-status" else {}


class FakeAgent:
    """The guest side: HELLO with ``features`` (none: a 1.0.0 agent, whose HELLO has no
    features field and who refuses the frames it does not know). ``seen`` records each
    request with the VM's status when it arrived."""

    def __init__(self, qmp: FakeQmp, features: Features) -> None:
        self.qmp, self.features = qmp, features
        self.answer_hello = True
        self.freeze_error: Error | None = None
        self.freeze_silent = False
        self.frozen = False
        self.seen: list[tuple[str, str]] = []

    async def serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                self.seen.append((MsgType(frame.type).name, self.qmp.status))
                reply = self._answer(frame.type, frame.stream, frame.payload)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        writer.close()

    def _answer(self, type: int, stream: int, payload: bytes) -> bytes | None:
        if type == MsgType.HELLO:
            hello = Hello(1, "1.1.0" if self.features else "1.0.0", "k", self.features).encode()
            hello = hello if self.features else hello[:-4]
            return encode_frame(MsgType.HELLO, 0, hello) if self.answer_hello else None
        if not self.features or type not in (MsgType.FSFREEZE, MsgType.FSTHAW):
            unknown = Error(errno.EINVAL, f"unknown frame type {type:#04x}")
            return encode_frame(MsgType.ERROR, stream, unknown.encode())
        if type == MsgType.FSTHAW:
            thawed, self.frozen = int(self.frozen), False
            return encode_frame(MsgType.OK, stream, FsThawed(thawed).encode())
        assert FsFreeze.decode(payload).timeout_ms == fsfreeze.AUTO_THAW_MS
        if self.freeze_silent:
            return None
        if self.freeze_error is not None:
            return encode_frame(MsgType.ERROR, stream, self.freeze_error.encode())
        self.frozen = True
        return encode_frame(MsgType.OK, stream, FsFrozen(("/",)).encode())


@dataclass
class Peer:
    qmp: FakeQmp
    agent: FakeAgent
    client: AgentClient

    async def connect(self) -> AgentClient:
        return self.client


@pytest.fixture
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    host, guest = socket.socketpair()
    qmp = FakeQmp()
    agent = FakeAgent(qmp, getattr(request, "param", Features.FSFREEZE))
    task = asyncio.create_task(agent.serve(guest))
    reader, writer = await asyncio.open_connection(sock=host)
    client = await AgentClient.open(reader, writer, timeout=5)
    agent.seen.clear()
    try:
        yield Peer(qmp, agent, client)
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _inst(state: InstanceState = InstanceState.RUNNING) -> Instance:
    return Instance(
        name="deb",
        type=InstanceType.VM,
        image="debian",
        limits=Limits(),
        state=state,
        created_at=datetime.now(UTC),
    )


def _building(tmp_path: Path) -> tuple[SnapshotStore, Path]:
    store = SnapshotStore(tmp_path, "deb")
    tmp = store.root / ".tmp-s1"
    tmp.mkdir(parents=True)
    return store, tmp


async def test_freeze_around_the_capture_then_thaw(peer: Peer, tmp_path: Path) -> None:
    qmp, agent = peer.qmp, peer.agent
    _, dest = _building(tmp_path)
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), dest, memory=False) as q:
        # The disk switches with the guest frozen and paused, as the caller left it.
        assert agent.frozen and qmp.status == "paused"
        assert q.frozen == ("/",) and q.warning is None
    assert not agent.frozen and qmp.status == "paused"
    # The agent works with the vCPUs running; paused again around the switch.
    assert agent.seen == [("HELLO", "running"), ("FSFREEZE", "running"), ("FSTHAW", "running")]
    assert qmp.log == ["query-status", "cont", "stop", "query-status", "cont", "stop"]
    assert not list(dest.iterdir()), "no warning"


async def test_a_failed_capture_still_thaws(peer: Peer, tmp_path: Path) -> None:
    qmp, agent = peer.qmp, peer.agent
    with pytest.raises(RuntimeError, match="disk switch failed"):
        async with fsfreeze.quiesced(qmp, peer.connect, _inst(), tmp_path, memory=False):
            assert agent.frozen
            raise RuntimeError("disk switch failed")
    assert not agent.frozen and [t for t, _ in agent.seen][-1] == "FSTHAW"
    assert qmp.status == "paused"


@pytest.mark.parametrize("peer", [Features.NONE], indirect=True)
async def test_an_old_agent_gives_a_crash_consistent_snapshot_with_a_warning(
    peer: Peer, tmp_path: Path
) -> None:
    qmp, agent = peer.qmp, peer.agent
    store, dest = _building(tmp_path)
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), dest, memory=False) as q:
        assert q.frozen == () and qmp.status == "paused"
    assert q.warning and "1.0.0 cannot freeze" in q.warning and "crash-consistent" in q.warning
    assert [t for t, _ in agent.seen] == ["HELLO"], "nothing it does not know is asked"
    # The warning reaches the snapshot's info (and the caller's copy of it).
    info = SnapshotInfo(name="s1", instance="deb", created_at=datetime.now(UTC))
    store.write_meta(dest, info)
    assert info.warning == q.warning
    assert SnapshotInfo.model_validate_json((dest / "meta.json").read_text()).warning == q.warning


async def test_a_refused_freeze_gives_the_guests_reason(peer: Peer, tmp_path: Path) -> None:
    qmp, agent = peer.qmp, peer.agent
    agent.freeze_error = Error(errno.EIO, "cannot freeze /mnt: Input/output error")
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), tmp_path, memory=False) as q:
        pass
    assert q.warning and "cannot freeze /mnt: Input/output error" in q.warning
    assert qmp.status == "paused"


async def test_a_silent_or_missing_agent(
    peer: Peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qmp, agent = peer.qmp, peer.agent
    monkeypatch.setattr(fsfreeze, "PING_TIMEOUT", 0.2)
    agent.answer_hello = False
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), tmp_path, memory=False) as q:
        pass
    assert q.warning and "did not answer" in q.warning
    assert [t for t, _ in agent.seen] == ["HELLO"] and qmp.status == "paused"

    async def no_agent() -> AgentClient:
        raise AgentError("cannot connect to the guest agent socket")

    async with fsfreeze.quiesced(qmp, no_agent, _inst(), tmp_path, memory=False) as q:
        pass
    assert q.warning and "cannot connect" in q.warning and qmp.status == "paused"


async def test_a_freeze_that_never_answers_is_thawed_anyway(
    peer: Peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qmp, agent = peer.qmp, peer.agent
    monkeypatch.setattr(fsfreeze, "FREEZE_TIMEOUT", 0.2)
    agent.freeze_silent = True
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), tmp_path, memory=False) as q:
        pass
    assert q.warning and "within 0.2 s" in q.warning
    # It may have frozen after all: the thaw is sent.
    assert [t for t, _ in agent.seen] == ["HELLO", "FSFREEZE", "FSTHAW"]


async def test_memory_snapshots_and_paused_vms_are_not_frozen(peer: Peer, tmp_path: Path) -> None:
    qmp, agent = peer.qmp, peer.agent
    async with fsfreeze.quiesced(qmp, peer.connect, _inst(), tmp_path, memory=True) as q:
        pass
    assert q.warning is None and agent.seen == [] and qmp.log == []
    paused = _inst(InstanceState.PAUSED)
    async with fsfreeze.quiesced(qmp, peer.connect, paused, tmp_path, memory=False) as q:
        pass
    assert q.warning and "is paused" in q.warning
    assert agent.seen == [] and qmp.log == [], "a VM the user paused is not run"
