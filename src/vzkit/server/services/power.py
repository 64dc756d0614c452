"""Starting and stopping an instance whose lock the caller holds, and the capacity check.

Shared by the services that start or stop instances as part of their work (create,
state changes, restoring a snapshot): each records every step (starting, running, or
error with the reason) through the guard.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

from vzkit.api.host import HostInfo
from vzkit.api.instances import Instance, InstanceState, Limits, StateChange
from vzkit.engines.base import EngineState
from vzkit.errors import NotFound, VzError
from vzkit.host.resources import OvercommitPolicy, check_fit
from vzkit.server import lifecycle
from vzkit.server.services.guard import Engines, InstanceGuard
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.volumes import VolumeService


def now() -> datetime:
    return datetime.now(UTC)


class Power:
    def __init__(
        self,
        guard: InstanceGuard,
        engines: Engines,
        networks: NetworkService,
        volumes: VolumeService,
        host: HostInfo,
        policy: OvercommitPolicy,
    ) -> None:
        self.guard = guard
        self.engines = engines
        self.networks = networks
        self.volumes = volumes
        self.host = host
        self.policy = policy

    def check_fit(self, limits: Limits, *, besides: str | None = None) -> None:
        """ResourceExhausted unless ``limits`` fit beside what the other instances hold
        (``besides``: an active instance whose own share is being changed)."""
        if besides is None:
            busy = [
                i.limits for i in self.guard.instances(lifecycle.ACTIVE | {InstanceState.CREATING})
            ]
        else:
            busy = [i.limits for i in self.guard.instances(lifecycle.ACTIVE) if i.name != besides]
        check_fit(limits, busy, self.host, self.policy)

    async def start(
        self, inst: Instance, uuid: str, state: EngineState, memory: Path | None = None
    ) -> Instance:
        """Boot ``inst`` (or, with ``memory``, load that saved state) and record it running."""
        engine = self.engines.of(inst.type)
        inst = self.guard.save(inst, state=InstanceState.STARTING, reason=None)
        try:
            net = self.networks.plan(inst, uuid)
            volumes = self.volumes.mounts(inst)
            if memory is None:
                started = await engine.start(inst, uuid, state, net, volumes)
            else:
                caps = self.engines.caps(inst.type)
                saver = caps.memory_snapshots
                if saver is None:
                    raise caps.refusals["snapshot-stateful"].error(inst.name)
                started = await saver.start_from(inst, uuid, state, net, memory, volumes)
        except VzError as exc:
            self.guard.save(
                inst, state=InstanceState.ERROR, reason=f"start failed: {exc.message}", pid=None
            )
            raise
        except BaseException:
            self.guard.save(
                inst, state=InstanceState.ERROR, reason="start was interrupted", pid=None
            )
            raise
        return self.guard.save(
            inst,
            state=InstanceState.RUNNING,
            pid=started.pid,
            accel=started.accel,
            started_at=now(),
            agent_version=started.agent_version,
            kernel_release=started.kernel_release,
        )

    async def stop(self, inst: Instance, change: StateChange) -> Instance:
        inst = self.guard.save(inst, state=InstanceState.STOPPING)
        # NotFound: the process is already gone and the exit handler recorded it.
        with contextlib.suppress(NotFound):
            await self.engines.of(inst.type).stop(
                inst.name, force=change.force, timeout=change.timeout
            )
        return self.guard.save(
            inst, state=InstanceState.STOPPED, pid=None, reason="stopped by request"
        )
