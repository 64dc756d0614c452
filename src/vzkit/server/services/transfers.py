"""Moving instances between hosts (export/import) and turning one into an image (publish).

An export is one tar stream: ``vzkit-export.json`` (format version, the instance record,
its engine's facts and the image it was made from) and ``instance/``, the files that make
the instance, as its engine stages them: a VM's qcow2 chain (the image's disk included, so
the target host needs nothing else), a container's upper layer, and every snapshot. GNU
tar writes it (xattrs and whiteouts of a container's upper layer survive, sparse files
stay sparse).

A running VM is exported from a frozen layer (the same live switch a snapshot does), so
the archive is consistent without stopping it; an engine that cannot export live (a
container's files change under it) refuses while the instance runs.

Import never trusts the archive. It is unpacked by ``vzkit.storage.unpack`` in a child
process with capped memory, fed through a pipe: only regular files and directories outside
a container's own files (``OWNED``), every member created below a directory fd without
following links, sizes capped by ``max_import_size``. The header is read bounded and
validated as a strict model (:class:`ExportHeader`), names obey the name rules, each
snapshot's ``meta.json`` is validated, and the engine checks its files before it adopts
them (every qcow2 and its backing chain a plain qcow2 file of the archive, no external
data file). Any refusal leaves nothing: the staging dir goes, no record is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import sys
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from vzkit.api.base import Strict
from vzkit.api.bounds import NAME_RE, NAME_RULE
from vzkit.api.instances import ImageInfo, Instance
from vzkit.engines.base import EngineState, Export
from vzkit.errors import Conflict, InvalidConfig, TooLarge
from vzkit.host import safefs
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.limits import IMPORT
from vzkit.server.services.guard import Engines, InstanceGuard, InstanceRecord
from vzkit.server.services.images import ImageService, Progress
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.snapshots import SnapshotService
from vzkit.settings import Settings
from vzkit.storage.snapshots import SnapshotStore
from vzkit.storage.unpack import HEADER, HEADER_MAX

FORMAT = 1
_CHUNK = 1 << 20
IMPORT_PREFIX = ".import-"
EXPORT_PREFIX = ".export-"
# The trees of an archive a container owns (its upper layer, each snapshot's copy of it):
# their links, devices and modes are the container's, kept as they are (storage/unpack.py).
OWNED = ("instance/upper", "instance/snapshots/*/upper")


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
            stage = self.settings.instances_dir / f"{EXPORT_PREFIX}{uuidlib.uuid4().hex}"
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
        # Sizes as the files' own: a link the container planted is never followed.
        return safefs.tree_size(stage)

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
        if name is not None and not NAME_RE.match(name):
            raise InvalidConfig(f"invalid instance name {name!r}: {NAME_RULE}")
        stage = self.settings.instances_dir / f"{IMPORT_PREFIX}{uuidlib.uuid4().hex}"
        self.settings.instances_dir.mkdir(parents=True, exist_ok=True)
        stage.mkdir(mode=0o700)
        try:
            await _unpack(data, stage, self.settings.max_import_size)
            return await self._adopt(stage, name)
        finally:
            await asyncio.to_thread(shutil.rmtree, stage, True)

    def remove_staging(self) -> list[str]:
        """After a daemon start: the staging dirs of exports and imports it was doing when it
        stopped (nothing else knows them); returns their names."""
        root = self.settings.instances_dir
        if not root.is_dir():
            return []
        gone = []
        for entry in root.iterdir():
            if entry.name.startswith((IMPORT_PREFIX, EXPORT_PREFIX)) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                gone.append(entry.name)
        return gone

    async def _adopt(self, stage: Path, name: str | None) -> Instance:
        header = _read_header(stage)
        record = header.instance
        if name is None and not NAME_RE.match(record.name):
            raise InvalidConfig(
                f"the archive's instance name {record.name!r} is not a valid name: {NAME_RULE}",
                hint="import it under a name of your choice: vz import FILE --name NEW",
            )
        new_name = name or record.name
        if self.guard.exists(new_name):
            raise Conflict(
                f"an instance named {new_name!r} already exists",
                hint="import under another name: vz import FILE --name NEW",
            )
        files = stage / "instance"
        if not safefs.exists(stage, "instance", stat.S_IFDIR):
            raise InvalidConfig("not a vzkit export: it has no instance/ directory", hint=_HINT)
        engine = self.engines.of(record.type)
        export = self.engines.caps(record.type).export
        await asyncio.to_thread(SnapshotStore(files, new_name).verify)
        await asyncio.to_thread(export.check_archive, files, header.runtime)
        local = await self.images.ensure(record.image)
        state = await export.adopt(files, header.runtime, record, local, header.image)
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


class ExportHeader(Strict):
    """``vzkit-export.json``: checked like a request body (and read no larger than one)."""

    format: int
    instance: Instance
    runtime: dict[str, str] = Field(default_factory=dict, description="the engine's facts")
    image: ImageInfo

    @field_validator("format")
    @classmethod
    def _format(cls, value: int) -> int:
        if value != FORMAT:
            raise ValueError(f"unsupported export format {value} (this vzd reads {FORMAT})")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: ImageInfo) -> ImageInfo:
        if not NAME_RE.match(value.name) or value.files:
            raise ValueError(f"invalid image {value.name!r}: {NAME_RULE}, and no files")
        return value


_HINT = "create one with: vz export INSTANCE FILE"


def _read_header(stage: Path) -> ExportHeader:
    """The archive's header, validated (the unpacker made it a regular file of at most
    HEADER_MAX bytes; it is read without following a link all the same)."""
    try:
        raw = safefs.read_bytes(stage, HEADER, HEADER_MAX)
    except OSError as exc:
        raise InvalidConfig(
            f"not a vzkit export: no readable {HEADER} ({exc.strerror})", hint=_HINT
        ) from exc
    try:
        header = ExportHeader.model_validate_json(raw)
    except ValidationError as exc:
        # The fields and messages only: the input is the archive's, never quoted back whole.
        why = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'header'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise InvalidConfig(f"not a vzkit export: {why}", hint=_HINT) from exc
    if header.instance.image != header.image.name:
        raise InvalidConfig("not a vzkit export: its instance and image disagree", hint=_HINT)
    return header


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


async def _unpack(data: AsyncIterator[bytes], stage: Path, cap: int) -> None:
    """Feed the upload to the unpacker (``vzkit.storage.unpack``, a child process with its
    memory capped) through a pipe, which bounds what is buffered here."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-m", "vzkit.storage.unpack", "--dest", str(stage),
        *(a for tree in OWNED for a in ("--owned", tree)),
        "--max-member", str(cap), "--max-total", str(cap),
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
        pass  # the unpacker refused the archive: its stderr says why
    except BaseException:
        # The upload was cut (a limit, a disconnect): the unpacker must be gone before the
        # caller removes the staging dir, or it could write into it again.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()
    err = (await proc.stderr.read()).decode(errors="replace").strip()
    if await proc.wait() == 0:
        return
    last = err.splitlines()[-1] if err else ""
    with contextlib.suppress(ValueError):
        refusal = json.loads(last)
        if refusal.get("too_large"):  # the same answer as a body over the cap
            raise TooLarge(
                f"import refused: {refusal['error']}",
                hint=f"send less; the server's limit is {IMPORT.env}",
            )
        raise InvalidConfig(f"import refused: {refusal['error']}", hint=refusal.get("hint"))
    raise InvalidConfig(
        f"the archive could not be unpacked: {last[-500:] or f'status {proc.returncode}'}",
        hint="is it a complete file made by vz export?",
    )
