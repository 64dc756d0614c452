"""Moving instances between hosts (export/import) and turning one into an image (publish).

An export is one tar stream: ``vzkit-export.json`` (format version, the instance record,
its engine's facts and the image it was made from) and ``instance/``, the files that make
the instance, as its engine stages them: a VM's qcow2 chain (the image's disk included, so
the target host needs nothing else), a container's upper layer, and every snapshot. GNU
tar writes and reads it (xattrs and whiteouts of a container's upper layer survive,
sparse files stay sparse).

A running VM is exported from a frozen layer (the same live switch a snapshot does), so
the archive is consistent without stopping it; an engine that cannot export live (a
container's files change under it) refuses while the instance runs.

Import never trusts the archive: members are unpacked into a fresh directory by tar
(which refuses absolute and ``..`` names), the record is validated as a strict model,
and the engine checks the files before it adopts them (every qcow2 must be a qcow2 whose
backing file is another file of the archive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import ValidationError

from vzkit.api.instances import ImageInfo, Instance
from vzkit.engines.base import EngineState, Export
from vzkit.errors import Conflict, InvalidConfig
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.services.guard import Engines, InstanceGuard, InstanceRecord
from vzkit.server.services.images import ImageService, Progress
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.snapshots import SnapshotService
from vzkit.settings import Settings
from vzkit.storage.snapshots import SnapshotStore

FORMAT = 1
HEADER = "vzkit-export.json"
_CHUNK = 1 << 20


class TransferService:
    def __init__(
        self,
        settings: Settings,
        guard: InstanceGuard,
        engines: Engines,
        snapshots: SnapshotService,
        images: ImageService,
        networks: NetworkService,
        events: EventBus,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.engines = engines
        self.snapshots = snapshots
        self.images = images
        self.networks = networks
        self.events = events

    # -- export ----------------------------------------------------------------------------

    async def export(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        """The archive as a stream, and its approximate size (for progress)."""
        async with self.guard.hold(name) as rec:
            caps = self.engines.caps(rec.instance.type)
            lifecycle.live("export", name, rec.instance.state, caps, caps.live_export)
            state = rec.engine_state
            if caps.disk_layers is not None:
                # A frozen layer is the exported disk: it never changes, running or not.
                frozen = await self.snapshots.freeze(rec, caps.disk_layers)
                if frozen is not None:
                    state = frozen.fixed
            stage = self.settings.instances_dir / f".export-{uuidlib.uuid4().hex}"
            try:
                size = await asyncio.to_thread(self._stage, rec, caps.export, state, stage)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
        return size, _tar_out(stage)

    def _stage(self, rec: InstanceRecord, export: Export, state: EngineState, stage: Path) -> int:
        """Hard links of everything the archive holds, under ``stage`` (nothing is copied)."""
        inst = rec.instance
        files = stage / "instance"
        files.mkdir(parents=True)
        layers = self.snapshots.layers(inst, rec.uuid)
        facts = export.stage(inst, rec.uuid, state, layers, files)
        image = self.images.get(inst.image)
        header = {
            "format": FORMAT,
            "instance": inst.model_dump(mode="json"),
            "runtime": facts,
            "image": image.model_dump(mode="json", exclude={"files"}),
        }
        (stage / HEADER).write_text(json.dumps(header, indent=1))
        return sum(p.lstat().st_size for p in stage.rglob("*") if p.is_file())

    # -- publish ---------------------------------------------------------------------------

    def check_publish(self, name: str, image: str) -> InstanceRecord:
        """Raise what :meth:`publish` would for this instance and image name, at once: the
        API calls it before its progress stream starts, so these are 4xx answers rather
        than errors inside a 200 stream (and come before a disk is flattened for nothing)."""
        rec = self.guard.load(name)
        inst = rec.instance
        caps = self.engines.caps(inst.type)
        publish = lifecycle.require("publish", name, inst.state, caps, caps.publish)
        publish.disk(inst, rec.uuid, rec.engine_state)
        self.images.check_new_name(image)
        return rec

    async def publish(self, name: str, image: str, progress: Progress) -> ImageInfo:
        """A new image whose disk is the instance's disk, flattened into one file."""
        async with self.guard.lock(name):
            rec = self.check_publish(name, image)
            publish = self.engines.caps(rec.instance.type).publish
            assert publish is not None  # check_publish says so
            frozen = await self.snapshots.freeze(rec, publish)
            disk = publish.disk(
                rec.instance, rec.uuid, frozen.fixed if frozen else rec.engine_state
            )
        base = self.images.get(rec.instance.image)
        tmp = self.images.scratch(f"{uuidlib.uuid4().hex}.qcow2")
        try:
            await publish.flatten(disk, tmp, lambda f: progress("flattening the disk", f))
            progress("storing the image", None)
            return await self.images.publish(image, base, tmp, name)
        finally:
            tmp.unlink(missing_ok=True)

    # -- import ----------------------------------------------------------------------------

    async def import_(self, data: AsyncIterator[bytes], name: str | None) -> Instance:
        stage = self.settings.instances_dir / f".import-{uuidlib.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            await _tar_in(data, stage)
            return await self._adopt(stage, name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    async def _adopt(self, stage: Path, name: str | None) -> Instance:
        record, image, facts = _read_header(stage)
        new_name = name or record.name
        if self.guard.exists(new_name):
            raise Conflict(
                f"an instance named {new_name!r} already exists",
                hint="import under another name: vz import FILE --name NEW",
            )
        files = stage / "instance"
        engine = self.engines.of(record.type)
        export = self.engines.caps(record.type).export
        await asyncio.to_thread(export.check_archive, files, facts)
        local = await self.images.ensure(record.image)
        state = await export.adopt(files, facts, record, local, image)
        new_uuid = str(uuidlib.uuid4())
        async with self.networks.exclusive():
            inst = self.snapshots.copy_record(
                record, new_name, new_uuid, image_digest=local.digest, created_at=record.created_at
            )
            os.rename(files, engine.state_dir(new_uuid))
            try:
                self.guard.insert(inst, new_uuid, state)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
        SnapshotStore(engine.state_dir(new_uuid), new_name).cleanup()
        self.events.publish("instance-created", new_name, type=inst.type.value, imported=True)
        if inst.nics:
            await self.networks.sync()
        return inst


def _read_header(stage: Path) -> tuple[Instance, ImageInfo, dict[str, object]]:
    """The archive's instance record, its image and its engine's facts, validated."""
    try:
        header = json.loads((stage / HEADER).read_text())
        if header.get("format") != FORMAT:
            raise InvalidConfig(
                f"unsupported export format {header.get('format')!r} (this vzd reads {FORMAT})",
                hint="export it again with this version of vzkit",
            )
        record = Instance.model_validate(header["instance"])
        image = ImageInfo.model_validate({**header["image"], "files": {}})
    except (OSError, ValueError, KeyError, ValidationError) as exc:
        raise InvalidConfig(
            f"not a vzkit export: {exc}", hint="create one with: vz export INSTANCE FILE"
        ) from exc
    return record, image, dict(header.get("runtime") or {})


async def _tar_out(stage: Path) -> AsyncIterator[bytes]:
    proc = await asyncio.create_subprocess_exec(
        "tar", "-C", str(stage), "--xattrs", "--xattrs-include=*", "--numeric-owner",
        "--sparse", "-cf", "-", HEADER, "instance",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        while chunk := await proc.stdout.read(_CHUNK):
            yield chunk
        await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        shutil.rmtree(stage, ignore_errors=True)


async def _tar_in(data: AsyncIterator[bytes], stage: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "tar", "-C", str(stage), "--xattrs", "--xattrs-include=*", "--numeric-owner",
        "--no-overwrite-dir", "-xf", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    try:
        async for chunk in data:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # tar gave up: its stderr says why
    except BaseException:
        # The upload was cut (a limit, a disconnect): tar must be gone before the caller
        # removes the staging dir, or it could write into it again.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()
    err = await proc.stderr.read()
    if await proc.wait() != 0:
        raise InvalidConfig(
            f"the archive could not be unpacked: {err.decode(errors='replace').strip()[-500:]}",
            hint="is it a complete file made by vz export?",
        )
