"""The real guest agent's file system freeze (FSFREEZE/FSTHAW), run on the host.

A freeze reaches every writable block-backed file system the agent can see, so the agent
runs in a mount namespace of its own whose root is a tmpfs, with one ext4 file system on
a loop device at /data: nothing of the host is in its view (checked before any freeze).
The test looks at the frozen state from outside through FIFREEZE itself (EBUSY: frozen),
which never blocks, unlike a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import wait_for
from vzkit.engines.qemu.agent import AgentClient
from vzkit.errors import AgentError
from vzkit.guest.build import agent_binary
from vzkit.guest.protocol import Features
from vzkit.images.initramfs import BUSYBOX
from vzkit.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
LOOP_MAJOR = 7

# $1 image, $2 agent, $3 busybox, $4 new root (an empty dir), $5 the port's fd.
_SANDBOX = r"""
set -e
root=$4
mount -t tmpfs -o mode=0755 vzt-freeze "$root"
mkdir "$root/bin" "$root/data" "$root/proc" "$root/dev" "$root/old"
cp "$3" "$root/bin/busybox"
for c in sh cat echo sync sleep ls umount rmdir; do ln -s busybox "$root/bin/$c"; done
cp "$2" "$root/vz-agent"
: > "$root/dev/null"
mount --bind /dev/null "$root/dev/null"
mount -o loop "$1" "$root/data"
mount -t proc proc "$root/proc"
cd "$root"
pivot_root . old
export PATH=/bin
umount -l /old
rmdir /old
exec /vz-agent --fd "$5" --no-poweroff
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def agent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_binary(Settings(cache_dir=tmp_path_factory.mktemp("cache")))


class Sandbox:
    def __init__(self, agent: Path, tmp: Path) -> None:
        image = tmp / "data.ext4"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
        (tmp / "root").mkdir()
        self.image = image
        host, guest = socket.socketpair()
        self.sock = host
        args = [image, agent, BUSYBOX, tmp / "root", guest.fileno()]
        try:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SANDBOX, "sh"]
                + [str(a) for a in args],
                pass_fds=(guest.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            guest.close()

    async def connect(self) -> AgentClient:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        return await AgentClient.open(reader, writer, timeout=10)

    def _data_fd(self) -> int:
        fd = os.open(f"/proc/{self.proc.pid}/root/data", os.O_RDONLY | os.O_DIRECTORY)
        # Never touch anything but the sandbox's own loop file system.
        if os.major(os.fstat(fd).st_dev) != LOOP_MAJOR:
            os.close(fd)
            raise AssertionError("/data of the sandbox is not its loop device")
        return fd

    def frozen(self) -> bool:
        """Whether /data is frozen: FIFREEZE says EBUSY then (else it is undone at once)."""
        fd = self._data_fd()
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            assert exc.errno == errno.EBUSY, exc
            return True
        else:
            fcntl.ioctl(fd, FITHAW, 0)
            return False
        finally:
            os.close(fd)

    def thaw(self) -> None:
        with contextlib.suppress(OSError):
            fd = self._data_fd()
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            finally:
                os.close(fd)

    def file(self, name: str) -> bytes | None:
        """A file of /data as the image on disk holds it (not the page cache of the
        sandbox's mount): what a snapshot of the disk would hold."""
        r = subprocess.run(
            ["debugfs", "-R", f"cat /{name}", str(self.image)], capture_output=True, check=True
        )
        return r.stdout if b"File not found" not in r.stderr else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                # A writer blocked on a frozen /data keeps the namespace: thaw it first.
                self.thaw()
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


@pytest.fixture
def sandbox(agent_path: Path, tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(agent_path, tmp_path)
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[AgentClient]:
    c = await sandbox.connect()
    try:
        mounts = (await c.run(["cat", "/proc/self/mountinfo"])).stdout.decode()
        block = [line.split()[4] for line in mounts.splitlines() if line.split()[2][:2] != "0:"]
        assert block == ["/data"], f"the sandbox sees more than its loop device:\n{mounts}"
        yield c
    finally:
        await c.close()


async def test_freeze_flushes_blocks_writers_and_thaws(
    client: AgentClient, sandbox: Sandbox
) -> None:
    assert client.hello.features & Features.FSFREEZE
    # Not synced: only in the page cache of the sandbox's mount, not in the image yet.
    assert (await client.run(["sh", "-c", "echo unsynced > /data/before"])).exit_code == 0

    assert await client.fsfreeze(60_000) == ("/data",), "tmpfs, proc and the rest skipped"
    assert sandbox.frozen()
    assert sandbox.file("before") == b"unsynced\n", "the freeze wrote it to the disk"
    writer = await client.exec(["sh", "-c", "echo after > /data/after"])
    with pytest.raises(AgentError, match="frozen"):
        await client.push_file("/data/pushed", b"x")
    with pytest.raises(AgentError, match="frozen already"):
        await client.fsfreeze(60_000)
    # The write waits for the thaw, however long it takes.
    await asyncio.sleep(0.5)
    assert writer.result is None and sandbox.file("after") is None

    assert await client.fsthaw() == 1
    assert (await writer.wait()).exit_code == 0
    assert not sandbox.frozen()
    assert await client.fsthaw() == 0, "nothing left to thaw"
    await client.push_file("/data/pushed", b"x")


async def test_freeze_thaws_by_itself_after_its_timeout(
    client: AgentClient, sandbox: Sandbox
) -> None:
    assert await client.fsfreeze(500) == ("/data",)
    writer = await client.exec(["sh", "-c", "echo late > /data/late"])
    # No FSTHAW: the agent's own deadline lets the writer through.
    result = await asyncio.wait_for(writer.wait(), 60)
    assert result.exit_code == 0 and not sandbox.frozen()
    assert await client.fsthaw() == 0


async def test_freeze_thaws_when_the_host_goes_away(sandbox: Sandbox) -> None:
    client = await sandbox.connect()
    assert await client.fsfreeze(600_000) == ("/data",)
    assert sandbox.frozen()
    await client.close()
    assert await asyncio.to_thread(wait_for, lambda: not sandbox.frozen(), 30)
    assert sandbox.proc.poll() is None, "the agent waits for the host to come back"
