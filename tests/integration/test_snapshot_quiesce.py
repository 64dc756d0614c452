"""Live disk snapshots quiesce the guest: what a program wrote just before the snapshot
is in it, synced or not. Without an agent that can freeze, the snapshot is still taken,
crash-consistent, and says so."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon
from tests.integration import helpers
from tests.integration.helpers import wait_for
from vzkit.sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The guest writes back nothing on its own for minutes: without a freeze, what was
# written is in its page cache only, never on the disk a snapshot captures.
_NO_WRITEBACK = (
    "mount -o remount,commit=600 / && echo 0 > /proc/sys/vm/dirty_writeback_centisecs"
    " && echo 60000 > /proc/sys/vm/dirty_expire_centisecs"
)


sh = functools.partial(helpers.sh, timeout=120)  # a Debian guest under TCG


@pytest.fixture
def deb(client: Client) -> Iterator[str]:
    """A running Debian VM: an ext4 root disk (the minimal image has no disk)."""
    client.create_instance(
        {"name": "qdeb", "image": "debian", "type": "vm", "limits": {"memory": "512MiB"}}
    )
    try:
        yield "qdeb"
    finally:
        client.delete_instance("qdeb", force=True)


def test_live_snapshot_holds_unsynced_writes(client: Client, deb: str) -> None:
    sh(client, deb, _NO_WRITEBACK)
    sh(client, deb, "echo written-before > /root/unsynced")
    info = client.create_snapshot(deb, "s1")
    assert info.warning is None, info.warning
    sh(client, deb, "echo written-after > /root/unsynced; echo x > /root/later; sync")

    client.restore_snapshot(deb, "s1")
    assert sh(client, deb, "cat /root/unsynced") == "written-before\n"
    assert sh(client, deb, "[ -e /root/later ] || echo absent") == "absent\n"
    # The guest was thawed: it writes on after the snapshot (and after the restore).
    sh(client, deb, "echo on > /root/after-restore; sync")


def test_without_an_agent_the_snapshot_is_crash_consistent_and_says_so(
    client: Client, vzd: Daemon, deb: str
) -> None:
    sh(client, deb, "echo synced > /root/kept; sync")
    # Replace the agent by a program that never answers (in this boot only: a bind
    # mount), and restart it from outside the agent's own cgroup.
    sh(
        client,
        deb,
        "printf '#!/bin/sh\\necho vz-fake-agent-up > /dev/console\\nexec sleep 3600\\n'"
        " > /run/fake-agent && chmod 755 /run/fake-agent"
        " && mount --bind /run/fake-agent /usr/sbin/vz-agent"
        " && systemd-run --no-block --on-active=2 systemctl restart vz-agent",
    )
    assert wait_for(lambda: b"vz-fake-agent-up" in client.console_log(deb), 120)

    r = vzd.vz("snapshot", "create", deb, "s1")
    assert r.returncode == 0, r.stderr
    assert b"warning: " in r.stderr and b"crash-consistent" in r.stderr, r.stderr
    info = client.get_snapshot(deb, "s1")
    assert info.warning and "did not answer" in info.warning
    assert info.layer is not None

    client.restore_snapshot(deb, "s1")  # a new boot, with the real agent again
    assert sh(client, deb, "cat /root/kept") == "synced\n"
