"""Quiescing a running guest's file systems while its disk is captured.

A disk layer frozen under a running guest holds only what reached the disk: a file
written just before, still in the guest's page cache, is missing after a restore. So
the guest agent syncs and freezes the guest's file systems (FSFREEZE, PROTOCOL.md)
around the switch to a new top layer, and thaws them after, whatever happened.

The snapshot service pauses a running VM before the disk is captured; a paused guest
cannot flush anything. So the vCPUs run again for the moments the agent works (freeze,
thaw) and are paused between, where the disk switches: the caller's pause is kept for
the switch itself. A frozen guest writes nothing, so the layer captured is consistent.

Where the guest cannot be quiesced (no agent, an agent older than the freeze, a freeze
that fails, a VM the user paused) the snapshot goes ahead crash-consistent, as a power
cut would leave the disk, with a warning in vzd's log and in the snapshot's info. A
memory snapshot needs no freeze: its saved memory holds what the disk lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vzkit.api.instances import Instance, InstanceState
from vzkit.engines.qemu.agent import AgentClient
from vzkit.errors import AgentError
from vzkit.guest.protocol import Features
from vzkit.storage import snapshots

log = logging.getLogger(__name__)

# The agent thaws by itself after this much guest time (which stands still while the
# VM is paused): a guest whose vzd died mid-snapshot is not left frozen.
AUTO_THAW_MS = 60_000
# An agent that does not answer a HELLO within this is taken as absent.
PING_TIMEOUT = 5.0
# sync() of a busy guest under TCG may take long; a freeze not done by then is given up.
FREEZE_TIMEOUT = 60.0
THAW_TIMEOUT = 30.0

_CRASH = "the snapshot is crash-consistent (as after a power cut)"


@dataclass
class Quiesce:
    """What happened: the mount points frozen, or why nothing was."""

    frozen: tuple[str, ...] = ()
    warning: str | None = None
    # A freeze was asked for: a thaw is sent whatever its answer (it may land late).
    thaw: bool = False
    agent: AgentClient | None = None


@contextlib.asynccontextmanager
async def quiesced(
    qmp: Any,
    connect: Callable[[], Awaitable[AgentClient]],
    inst: Instance,
    dest: Path | None,
    *,
    memory: bool,
) -> AsyncIterator[Quiesce]:
    """Freeze ``inst``'s guest file systems for the block; thaw after, even if it fails.

    ``dest``: where a snapshot is being built, to note a warning for its info (copies
    and exports capture a disk too: there it is only logged). ``memory``: the guest's
    memory is saved with the disk, so nothing is frozen.
    """
    q = Quiesce()
    if memory:
        yield q
        return
    if inst.state is not InstanceState.RUNNING:
        q.warning = f"{inst.name!r} is {inst.state.value}: its file systems cannot be frozen"
    else:
        try:
            await _freeze(qmp, connect, q)
        except BaseException:
            if q.thaw and q.agent is not None:
                await _thaw(qmp, q.agent, inst.name)
            raise
    if q.warning:
        q.warning = f"{q.warning}; {_CRASH}"
        log.warning("capturing the disk of %s: %s", inst.name, q.warning)
        if dest is not None:
            snapshots.leave_warning(dest, q.warning)
    elif q.frozen:
        log.info("%s: froze %s for the snapshot", inst.name, ", ".join(q.frozen))
    try:
        yield q
    finally:
        if q.thaw and q.agent is not None:
            await _thaw(qmp, q.agent, inst.name)


async def _freeze(qmp: Any, connect: Callable[[], Awaitable[AgentClient]], q: Quiesce) -> None:
    async with _vcpus_running(qmp):
        try:
            q.agent = agent = await connect()
            hello = await agent.ping(PING_TIMEOUT)
            if not hello.features & Features.FSFREEZE:
                q.warning = (
                    f"the guest agent {hello.agent_version} cannot freeze file systems "
                    "(rebuild the image for agent 1.1.0 or later)"
                )
                return
            q.thaw = True
            async with asyncio.timeout(FREEZE_TIMEOUT):
                q.frozen = await agent.fsfreeze(AUTO_THAW_MS)
        except TimeoutError:
            q.warning = f"the guest did not freeze its file systems within {FREEZE_TIMEOUT:g} s"
        except (AgentError, OSError) as exc:
            q.warning = f"the guest's file systems were not frozen: {exc}"


async def _thaw(qmp: Any, agent: AgentClient, name: str) -> None:
    try:
        async with _vcpus_running(qmp), asyncio.timeout(THAW_TIMEOUT):
            await agent.fsthaw()
    except Exception as exc:
        log.error(
            "thawing the file systems of %s failed (%s): its agent thaws them within %d s",
            name,
            exc,
            AUTO_THAW_MS // 1000,
        )


@contextlib.asynccontextmanager
async def _vcpus_running(qmp: Any) -> AsyncIterator[None]:
    """Let a paused guest run for the block (its agent must answer), then pause it again."""
    status: Any = await qmp.execute("query-status")
    paused = status.get("status") == "paused"
    if paused:
        await qmp.execute("cont")
    try:
        yield
    finally:
        if paused:
            await qmp.execute("stop")
