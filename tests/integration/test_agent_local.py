"""The real guest agent, run on the host over a socketpair (no QEMU needed)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vzkit._proc import alive
from vzkit.engines.qemu.agent import STDOUT, AgentClient
from vzkit.errors import AgentError, InvalidConfig, NotFound
from vzkit.guest.build import agent_binary
from vzkit.guest.protocol import VERSION, MsgType, encode_frame
from vzkit.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def agent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_binary(Settings(cache_dir=tmp_path_factory.mktemp("cache")))


class LocalAgent:
    """An agent process serving one end of a socketpair; the test holds the other."""

    def __init__(self, binary: Path) -> None:
        host, guest = socket.socketpair()
        self.sock = host
        try:
            self.proc = subprocess.Popen(
                [str(binary), "--fd", str(guest.fileno()), "--no-poweroff"],
                pass_fds=(guest.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            guest.close()

    async def connect(self, timeout: float = 5.0) -> AgentClient:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        return await AgentClient.open(reader, writer, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM makes the agent kill its sessions' process groups before exiting.
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


@pytest.fixture
def local_agent(agent_path: Path) -> Iterator[LocalAgent]:
    agent = LocalAgent(agent_path)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
async def client(local_agent: LocalAgent) -> AsyncIterator[AgentClient]:
    c = await local_agent.connect()
    try:
        yield c
    finally:
        await c.close()


async def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_hello(client: AgentClient) -> None:
    assert client.hello.proto_version == VERSION
    assert client.hello.agent_version
    assert client.hello.kernel_release == os.uname().release


async def test_exit_codes(client: AgentClient) -> None:
    assert (await client.run(["true"])).exit_code == 0
    assert (await client.run(["false"])).exit_code == 1
    done = await client.run(["sh", "-c", "exit 42"])
    assert done.result.exit_code == 42
    assert done.result.signal is None
    assert not done.result.timed_out
    assert done.result.error is None


async def test_binary_output_unchanged(client: AgentClient) -> None:
    pattern = bytes(range(256))
    size = 5 * 1024 * 1024
    # head -c keeps the test independent of the guest having python.
    done = await client.run(
        ["sh", "-c", f"while :; do printf '%s'; done | head -c {size}" % _printf_escape(pattern)]
    )
    assert done.exit_code == 0
    assert len(done.stdout) == size
    assert done.stdout == (pattern * (size // 256 + 1))[:size]


def _printf_escape(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


async def test_stdin_piping(client: AgentClient) -> None:
    data = os.urandom(1024 * 1024)
    done = await client.run(["cat"], input=data)
    assert done.exit_code == 0
    assert done.stdout == data


async def test_stdin_larger_than_agent_buffer(client: AgentClient) -> None:
    # Beyond the agent's 4 MiB stdin high-water mark it stops reading the connection
    # until the command catches up: the transfer must still complete.
    data = os.urandom(24 * 1024 * 1024)
    done = await client.run(["sh", "-c", "sleep 0.2; cat"], input=data)
    assert done.exit_code == 0
    assert len(done.stdout) == len(data)
    assert done.stdout == data


async def test_stdin_unread_by_command(client: AgentClient) -> None:
    done = await client.run(["true"], input=os.urandom(8 * 1024 * 1024))
    assert done.exit_code == 0
    assert (await client.run(["echo", "still fine"])).stdout == b"still fine\n"


async def test_stdin_interactive(client: AgentClient) -> None:
    session = await client.exec(["cat"], stdin=True)
    await session.write_stdin(b"ping\n")
    assert await session.read() == (STDOUT, b"ping\n")
    await session.close_stdin()
    assert await session.read() is None
    assert (await session.wait()).exit_code == 0


async def test_stdin_defaults_to_dev_null(client: AgentClient) -> None:
    done = await client.run(["cat"])
    assert done.exit_code == 0
    assert done.stdout == b""


async def test_stderr_separated(client: AgentClient) -> None:
    done = await client.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert done.stdout == b"out\n"
    assert done.stderr == b"err\n"
    assert done.exit_code == 3


async def test_env_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    done = await client.run(
        ["sh", "-c", 'echo "$FOO|$(pwd)|$HOME"'],
        env={"FOO": "bar baz", "PATH": "/usr/bin:/bin"},
        cwd=str(tmp_path),
    )
    assert done.stdout.decode() == f"bar baz|{tmp_path}|\n"
    default = await client.run(["sh", "-c", 'echo "$PATH|$HOME|$(pwd)"'])
    assert default.stdout.decode().startswith("/usr/local/sbin:")
    assert default.stdout.decode().endswith("|/root|/\n")


async def test_path_search_uses_command_env(client: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "hello-vz"
    script.write_text("#!/bin/sh\necho found\n")
    script.chmod(0o755)
    done = await client.run(["hello-vz"], env={"PATH": f"/nonexistent:{tmp_path}"})
    assert done.stdout == b"found\n"
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    denied = await client.run([str(noexec)])
    assert denied.result.exit_code == 126
    assert denied.result.error


async def test_missing_command(client: AgentClient) -> None:
    done = await client.run(["/no/such/command"])
    assert done.result.exit_code == 127
    assert done.result.error is not None
    assert "/no/such/command" in done.result.error
    session = await client.exec(["no-such-command-vz"])
    assert session.pid is None
    assert (await session.wait()).exit_code == 127


async def test_bad_cwd(client: AgentClient) -> None:
    done = await client.run(["true"], cwd="/no/such/dir")
    assert done.result.error is not None
    assert "/no/such/dir" in done.result.error
    assert done.result.exit_code in (126, 127)


async def test_timeout_kills(client: AgentClient) -> None:
    # Only the timeout can end it: the command alone would sleep for a day (how soon the
    # timeout acts: benchmarks/latencies.py).
    session = await client.exec(["sleep", "86400"], timeout=0.3)
    assert session.pid is not None
    result = await asyncio.wait_for(session.wait(), 50)
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert result.exit_code == 128 + signal.SIGKILL
    assert not alive(session.pid)


async def test_signal(client: AgentClient) -> None:
    session = await client.exec(["sleep", "100"])
    await session.signal(signal.SIGTERM)
    result = await session.wait()
    assert result.signal == signal.SIGTERM
    assert result.exit_code == 128 + signal.SIGTERM
    assert not result.timed_out


async def test_background_grandchild_does_not_hang_exit(client: AgentClient) -> None:
    session = await client.exec(["sh", "-c", "sleep 86400 & echo $!"])
    assert session.pid is not None
    try:
        out = b""
        while (item := await asyncio.wait_for(session.read(), 50)) is not None:
            out += item[1]
        assert session.result is not None and session.result.exit_code == 0
        # The exit came while the grandchild, which holds the output open, still lives.
        assert alive(int(out))
    finally:
        # The grandchild is in the session's process group: clean it up.
        os.killpg(session.pid, signal.SIGKILL)


async def test_tty(client: AgentClient) -> None:
    done = await client.exec(["tty"], tty=True)
    out = b""
    while (item := await done.read()) is not None:
        assert item[0] == STDOUT  # a tty has no separate stderr
        out += item[1]
    assert (await done.wait()).exit_code == 0
    assert re.match(rb"/dev/pts/\d+\r?\n", out), out

    session = await client.exec(
        ["sh", "-c", "stty size; read line; stty size"], tty=True, stdin=True, rows=30, cols=100
    )
    first = b""
    while b"\n" not in first:
        item = await session.read()
        assert item is not None
        first += item[1]
    assert first.strip() == b"30 100"
    await session.resize(40, 132)
    await session.write_stdin(b"go\n")
    rest = b""
    while (item := await session.read()) is not None:
        rest += item[1]
    assert b"40 132" in rest
    assert (await session.wait()).exit_code == 0


async def test_tty_env(client: AgentClient) -> None:
    session = await client.exec(["sh", "-c", "echo $TERM"], tty=True)
    out = b""
    while (item := await session.read()) is not None:
        out += item[1]
    assert out.strip() == b"xterm"


async def test_concurrent_execs(client: AgentClient, tmp_path: Path) -> None:
    # Each command waits until all ten have started: they can only pass if the agent runs
    # them at the same time (run one after the other, the first would give up with 99).
    started = tmp_path / "started"
    started.mkdir()
    barrier = (
        f"touch {started}/$0; n=0; while [ $(ls {started} | wc -l) -lt 10 ]; do "
        "n=$((n+1)); [ $n -gt 600 ] && exit 99; sleep 0.05; done"
    )

    async def one(i: int) -> None:
        script = f"{barrier}; head -c {100_000 + i} /dev/zero; echo {i} >&2; exit {i}"
        done = await client.run(["sh", "-c", script, str(i)])
        assert done.exit_code == i, done.stderr
        assert done.stdout == b"\0" * (100_000 + i)
        assert done.stderr == f"{i}\n".encode()

    await asyncio.gather(*(one(i) for i in range(10)))


async def test_file_round_trip(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    target = tmp_path / "sub" / "dir" / "blob.bin"
    # A missing parent is the caller's mistake (404 through the API), not the agent failing.
    with pytest.raises(NotFound, match=str(target)):
        await client.push_file(str(target), data)
    await client.push_file(str(target), data, mode=0o751, parents=True)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o751
    assert not [p for p in target.parent.iterdir() if p.name != "blob.bin"], "temp file left"

    mode, chunks = await client.pull_file(str(target))
    assert mode == 0o751
    assert b"".join([c async for c in chunks]) == data


async def test_push_from_iterator_and_overwrite(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    async def gen() -> AsyncIterator[bytes]:
        for i in range(100):
            yield f"line {i}\n".encode()

    await client.push_file(str(target), gen(), mode=0o600)
    assert target.read_text() == "".join(f"line {i}\n" for i in range(100))
    assert target.stat().st_mode & 0o777 == 0o600
    await client.push_file(str(target), b"")
    assert target.read_bytes() == b""


async def test_pull_errors(client: AgentClient, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(NotFound, match=str(missing)) as info:
        await client.pull_file(str(missing))
    assert info.value.details["errno"] == 2
    with pytest.raises(InvalidConfig, match=str(tmp_path)):
        await client.pull_file(str(tmp_path))
    # The connection is still usable after errors.
    assert (await client.run(["true"])).exit_code == 0


async def test_protocol_errors_do_not_break_the_agent(local_agent: LocalAgent) -> None:
    reader, writer = await asyncio.open_connection(sock=local_agent.sock)
    writer.write(b"garbage that is not a frame" + encode_frame(0x7E, 5, b"x"))
    await writer.drain()
    client = await AgentClient.open(reader, writer, timeout=5)
    try:
        assert (await client.run(["echo", "ok"])).stdout == b"ok\n"
    finally:
        await client.close()


async def test_host_disconnect_kills_sessions(local_agent: LocalAgent) -> None:
    client = await local_agent.connect()
    session = await client.exec(["sleep", "100"])
    pending = await client.exec(["sleep", "100"])
    assert session.pid is not None and alive(session.pid)
    await client.close()
    with pytest.raises(AgentError):
        await pending.wait()
    assert await _wait_gone(session.pid), "the agent did not kill the session on disconnect"
    # The agent stays up waiting for the host to come back (as on a virtio port).
    await asyncio.sleep(0.1)
    assert local_agent.proc.poll() is None


async def test_poweroff_no_poweroff(local_agent: LocalAgent) -> None:
    client = await local_agent.connect()
    try:
        await client.poweroff()
    finally:
        await client.close()
    assert await asyncio.to_thread(local_agent.proc.wait, 5) == 0


async def test_sigterm_kills_sessions(local_agent: LocalAgent) -> None:
    client = await local_agent.connect()
    try:
        session = await client.exec(["sleep", "100"])
        assert session.pid is not None
        local_agent.proc.terminate()
        assert await asyncio.to_thread(local_agent.proc.wait, 5) == 0
        assert await _wait_gone(session.pid)
    finally:
        await client.close()


async def test_raw_unknown_type_gets_error(local_agent: LocalAgent) -> None:
    client = await local_agent.connect()
    try:
        # An unknown type on a new stream is answered with ERROR on that stream.
        stream_id, stream = client._register()
        await client._send(0x7E, stream_id, b"")
        frame = await asyncio.wait_for(stream.get(), 5)
        assert frame.type == MsgType.ERROR
    finally:
        await client.close()
