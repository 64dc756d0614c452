"""Moving instances between hosts (export/import) and turning one into an image (publish).

An export is one tar stream: ``vzkit-export.json`` (format version, the instance record,
its runtime facts and the image it was made from) and ``instance/``, the files that make
the instance: a VM's qcow2 chain (the image's disk included, so the target host needs
nothing else), a container's upper layer, and every snapshot. GNU tar writes and reads it
(xattrs and whiteouts of a container's upper layer survive, sparse files stay sparse).

A running VM is exported from a frozen layer (the same live switch a snapshot does), so
the archive is consistent without stopping it; a container must be stopped.

Import never trusts the archive: members are unpacked into a fresh directory by tar
(which refuses absolute and ``..`` names), the record is validated as a strict model, and
every qcow2 file must be a qcow2 whose backing file is another file of the archive.
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
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vzkit.api.instances import ImageInfo, Instance, InstanceType
from vzkit.engines.qemu import disks as layers
from vzkit.errors import Conflict, ImageError, InvalidConfig, StateError
from vzkit.images.rootfs import container_rootfs
from vzkit.server import lifecycle
from vzkit.storage import qcow2
from vzkit.storage.snapshots import SnapshotStore

if TYPE_CHECKING:
    from vzkit.server.services.instances import Actions, Progress

FORMAT = 1
HEADER = "vzkit-export.json"
_CHUNK = 1 << 20
# What of an instance directory travels: disks, a container's files, snapshots.
_KEEP = ("upper", "snapshots")


def _no_disk(inst: Instance) -> InvalidConfig:
    return InvalidConfig(
        f"{inst.name!r} has no disk of its own: it boots image {inst.image!r} as is",
        hint="publish a VM with a root disk (such as one of the debian image)",
    )


class Transfers:
    def __init__(self, actions: Actions) -> None:
        self.a = actions

    # -- export ----------------------------------------------------------------------------

    async def export(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        """The archive as a stream, and its approximate size (for progress)."""
        async with self.a._lock(name):
            inst, uuid, runtime = self.a.db.get(name)
            engine = self.a._engine(inst.type)
            sdir = engine.state_dir(uuid)
            if inst.type is InstanceType.CONTAINER and inst.state in lifecycle.ACTIVE:
                raise StateError(
                    f"cannot export {name!r} while it runs: a container's files change under it",
                    hint=f"stop it first: vz stop {name}",
                )
            if inst.type is not InstanceType.CONTAINER:
                # A frozen layer is the exported disk: it never changes, running or not.
                frozen = await self._freeze(inst, uuid, runtime)
                if frozen is not None:
                    runtime = {**runtime, "top": frozen}
            stage = self.a.settings.instances_dir / f".export-{uuidlib.uuid4().hex}"
            try:
                size = await asyncio.to_thread(self._stage, inst, runtime, sdir, stage)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
        return size, _tar_out(stage)

    async def _freeze(self, inst: Instance, uuid: str, runtime: dict[str, Any]) -> str | None:
        """Freeze a VM's disk top (pausing a running VM for the switch); the frozen name."""
        engine = self.a._engine(inst.type)
        if not (engine.state_dir(uuid) / layers.top_name(runtime)).is_file():
            return None
        live = inst.state in lifecycle.ACTIVE
        if live:
            await engine.pause(inst.name)
        try:
            new_runtime, frozen = await engine.snapshot_disk(
                inst, uuid, runtime, engine.state_dir(uuid)
            )
        finally:
            if live:
                await engine.resume(inst.name)
        self.a.db.set_runtime(inst.name, new_runtime)
        return frozen

    def check_publish(self, name: str, image: str) -> tuple[Instance, str, dict[str, Any]]:
        """Raise what :meth:`publish` would for this instance and image name, at once: the
        API calls it before its progress stream starts, so these are 4xx answers rather
        than errors inside a 200 stream (and come before a disk is flattened for nothing)."""
        inst, uuid, runtime = self.a.db.get(name)
        if inst.type is InstanceType.CONTAINER:
            raise InvalidConfig(
                "containers cannot be published as images yet",
                hint=f"copy it instead (vz copy {name} NEW), or export it",
            )
        if not (self.a._engine(inst.type).state_dir(uuid) / layers.top_name(runtime)).is_file():
            raise _no_disk(inst)
        self.a.images.check_new_name(image)
        return inst, uuid, runtime

    async def publish(self, name: str, image: str, progress: Progress) -> ImageInfo:
        """A new image whose disk is the instance's disk, flattened into one file."""
        async with self.a._lock(name):
            inst, uuid, runtime = self.check_publish(name, image)
            frozen = await self._freeze(inst, uuid, runtime)
            if frozen is None:
                raise _no_disk(inst)
            sdir = self.a._engine(inst.type).state_dir(uuid)
        base = self.a.images.get(inst.image)
        tmp = self.a.settings.images_dir / f".tmp-publish-{uuidlib.uuid4().hex}.qcow2"
        try:
            await asyncio.to_thread(
                qcow2.convert,
                sdir / frozen,
                tmp,
                progress=lambda f: progress("flattening the disk", f),
            )
            progress("storing the image", None)
            return await asyncio.to_thread(self.a.images.publish, image, base, tmp, name)
        finally:
            tmp.unlink(missing_ok=True)

    def _stage(self, inst: Instance, runtime: dict[str, Any], sdir: Path, stage: Path) -> int:
        """Hard links of everything the archive holds, under ``stage`` (nothing is copied)."""
        files = stage / "instance"
        files.mkdir(parents=True)
        names: set[str] = set()
        store = SnapshotStore(sdir, inst.name)
        if inst.type is not InstanceType.CONTAINER:
            tops = [layers.top_name(runtime)] + [s.layer for s in store.list() if s.layer]
            for top in tops:
                if (sdir / top).is_file():
                    names.update(layers.chain(sdir, top))
        for n in names:
            os.link(sdir / n, files / n)
        for sub in _KEEP:
            if (sdir / sub).is_dir():
                _link_tree(sdir / sub, files / sub)
        image = self.a.images.get(inst.image)
        header = {
            "format": FORMAT,
            "instance": inst.model_dump(mode="json"),
            "runtime": {"top": runtime["top"]} if "top" in runtime else {},
            "image": image.model_dump(mode="json", exclude={"files"}),
        }
        (stage / HEADER).write_text(json.dumps(header, indent=1))
        return sum(p.lstat().st_size for p in stage.rglob("*") if p.is_file())

    # -- import ----------------------------------------------------------------------------

    async def import_(self, data: AsyncIterator[bytes], name: str | None) -> Instance:
        stage = self.a.settings.instances_dir / f".import-{uuidlib.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            await _tar_in(data, stage)
            return await self._adopt(stage, name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    async def _adopt(self, stage: Path, name: str | None) -> Instance:
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
        new_name = name or record.name
        if self.a.db.exists(new_name):
            raise Conflict(
                f"an instance named {new_name!r} already exists",
                hint="import under another name: vz import FILE --name NEW",
            )
        files = stage / "instance"
        runtime: dict[str, Any] = dict(header.get("runtime") or {})
        await asyncio.to_thread(_check_disks, files, runtime)
        local = await self.a.ensure_image(record.image)
        if local.digest != image.digest and record.type is InstanceType.CONTAINER:
            # A container's upper layer only makes sense over the same image files.
            raise ImageError(
                f"the archive's container was made from image {record.image!r} "
                f"{image.digest[:19]}, this host has {local.digest[:19]}",
                hint="build the same image version here, or publish the container as an image",
            )
        new_uuid = str(uuidlib.uuid4())
        engine = self.a._engine(record.type)
        if "top" in runtime:
            runtime["top"] = await layers.freeze_offline(files, runtime["top"])
        if record.type is InstanceType.CONTAINER:
            lower = await asyncio.to_thread(container_rootfs, self.a.settings, local)
            runtime = {"lower": str(lower)}
            for d in ("work", "rootfs", "bundle"):
                (files / d).mkdir(exist_ok=True)
            (files / "upper").mkdir(exist_ok=True)
        async with self.a._network_lock:
            inst = self.a.copy_record(
                record, new_name, new_uuid, image_digest=local.digest, created_at=record.created_at
            )
            os.rename(files, engine.state_dir(new_uuid))
            try:
                self.a.db.insert(inst, new_uuid, runtime)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
        SnapshotStore(engine.state_dir(new_uuid), new_name).cleanup()
        self.a.events.publish("instance-created", new_name, type=inst.type.value, imported=True)
        if inst.nics:
            await self.a._sync_network()
        return inst


def _link_tree(src: Path, dst: Path) -> None:
    # cp -al: a tree of hard links, ownership, modes and xattrs included.
    import subprocess

    subprocess.run(["cp", "-al", str(src), str(dst)], check=True, capture_output=True)


def _check_disks(files: Path, runtime: dict[str, Any]) -> None:
    """Every qcow2 of the archive is a qcow2 backed only by another file of the archive."""
    for path in files.glob("*.qcow2"):
        if path.is_symlink() or not path.is_file():
            raise InvalidConfig(f"archive member {path.name} is not a regular file")
        try:
            info = qcow2.info(path)
        except Exception as exc:
            raise InvalidConfig(f"archive disk {path.name} is not a valid qcow2: {exc}") from exc
        if info.get("format") != "qcow2":
            raise InvalidConfig(f"archive disk {path.name} is not a qcow2 image")
        backing = info.get("backing-filename")
        if backing is not None and (
            "/" in backing or backing.startswith(".") or not (files / backing).is_file()
        ):
            raise InvalidConfig(
                f"archive disk {path.name} points outside the archive ({backing!r})",
                hint="refusing it: a crafted backing path could read any file on this host",
            )
    top = runtime.get("top")
    if top is not None and (not isinstance(top, str) or not (files / top).is_file()):
        raise InvalidConfig(f"the archive's disk {top!r} is missing")


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
