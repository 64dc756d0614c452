"""The content-addressed image store.

Layout under ``settings.images_dir``::

    blobs/sha256-<hex>     one built artifact (kernel, initramfs, qcow2 root disk)
    <name>.json            the manifest: which blob plays which role
    .lock                  store-wide lock, held while blobs and manifests change
    .<name>.lock           held for a whole build so builds of one image are serialized
    .tmp-<name>-*          a build in progress (a leftover one is from a killed build)

Blobs are shared between images (the Debian image reuses the minimal image's kernel and
initramfs). A build is skipped when its *inputs key* (a hash of everything the builder
reads) matches the manifest's, so ``build`` is cheap to call again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vzkit.api.bounds import NAME_RE, NAME_RULE
from vzkit.api.instances import ImageInfo
from vzkit.errors import Conflict, ImageError, InvalidConfig, NotFound
from vzkit.host import perms
from vzkit.images.builder import Builder, BuilderFactory, BuildResult, Progress, sha256_file
from vzkit.images.debian import DebianBuilder
from vzkit.images.initramfs import MinimalBuilder
from vzkit.settings import Settings

# The contract's names, for the store's users (the builders import vzkit.images.builder).
__all__ = [
    "BuildResult",
    "Builder",
    "BuilderFactory",
    "ImageStore",
    "Progress",
    "default_builders",
    "sha256_file",
]

# Bump when the store's manifest format or hashing changes.
STORE_VERSION = "1"

# Roles that name files; "cmdline" is the only other entry in ImageInfo.files.
FILE_ROLES = ("kernel", "initrd", "rootfs")
CMDLINE_ROLE = "cmdline"

_MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "kernel": ((0x202, b"HdrS"),),
    "initrd": ((0, b"\x1f\x8b"), (0, b"\x28\xb5\x2f\xfd"), (0, b"070701")),
    "rootfs": ((0, b"QFI\xfb"),),
}


def _no_progress(step: str, fraction: float | None) -> None:
    pass


def default_builders() -> dict[str, BuilderFactory]:
    return {"minimal": MinimalBuilder, "debian": DebianBuilder}


@dataclass
class _Manifest:
    info: ImageInfo
    inputs_key: str
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {sha256, size}


def _build_hint(name: str) -> str:
    return f"rebuild it: vz image build {name} --force"


class ImageStore:
    def __init__(
        self, settings: Settings, builders: Mapping[str, BuilderFactory] | None = None
    ) -> None:
        self.settings = settings
        self.root = settings.images_dir
        self.blobs_dir = self.root / "blobs"
        self._builders = dict(builders) if builders is not None else default_builders()

    # -- queries -------------------------------------------------------------------------

    def known_names(self) -> list[str]:
        """Names that can be built (whether built yet or not)."""
        return sorted(self._builders)

    def list(self) -> list[ImageInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                m = self._read_manifest(path.stem)
            except ImageError:
                continue  # unreadable: get() reports it, build() replaces it
            if m is not None:
                out.append(m.info)
        return out

    def get(self, name: str) -> ImageInfo:
        m = self._read_manifest(name)
        if m is not None:
            return m.info
        if name in self._builders:
            raise NotFound(f"image '{name}' is not built yet", hint=f"vz image build {name}")
        raise NotFound(f"no image named '{name}'", hint="vz image list / vz image build NAME")

    def ensure(self, name: str, progress: Progress | None = None) -> ImageInfo:
        """The image, built first if it is missing."""
        try:
            return self.get(name)
        except NotFound:
            if name not in self._builders:
                raise
        return self.build(name, progress)

    # -- integrity -----------------------------------------------------------------------

    def check(self, info: ImageInfo, *, full: bool = False) -> None:
        """Raise ImageError if the image's files are missing or damaged.

        The cheap form (stat, size, magic bytes) runs at every launch; ``full`` also
        re-hashes each blob against its content address.
        """
        m = self._read_manifest(info.name)
        hint = _build_hint(info.name)
        if m is None or m.info.digest != info.digest:
            raise ImageError(
                f"image '{info.name}' is corrupt: its manifest is missing or has changed",
                hint=hint,
            )
        for role, value in info.files.items():
            if role == CMDLINE_ROLE:
                continue
            path = Path(value)
            expected = m.blobs.get(role, {})
            try:
                st = path.stat()
            except OSError:
                raise ImageError(
                    f"image '{info.name}' is corrupt: {role} file {path} is missing", hint=hint
                ) from None
            if st.st_size != expected.get("size"):
                raise ImageError(
                    f"image '{info.name}' is corrupt: {role} file {path} has "
                    f"{st.st_size} bytes, expected {expected.get('size')}",
                    hint=hint,
                )
            magics = _MAGIC.get(role)
            if magics and not _has_magic(path, magics):
                raise ImageError(
                    f"image '{info.name}' is corrupt: {role} file {path} has a wrong header",
                    hint=hint,
                )
            if full and sha256_file(path) != expected.get("sha256"):
                raise ImageError(
                    f"image '{info.name}' is corrupt: {role} file {path} does not match "
                    "its checksum",
                    hint=hint,
                )

    # -- changes -------------------------------------------------------------------------

    def build(self, name: str, progress: Progress | None = None, force: bool = False) -> ImageInfo:
        """Build ``name``, or return it unchanged when its inputs have not changed."""
        report = progress or _no_progress
        factory = self._builders.get(name)
        if factory is None:
            raise NotFound(
                f"no image named '{name}' can be built",
                hint=f"known images: {', '.join(self.known_names())}",
            )
        builder = factory(self.settings)
        self._make_dirs()
        with _flock(self.root / f".{name}.lock"):
            self._clean_stale_tmp(name)
            report("checking inputs", None)
            inputs_key = _inputs_key(builder.inputs())
            try:
                current = self._read_manifest(name)
            except ImageError:
                current = None  # an unreadable manifest is replaced
            if current is not None and current.inputs_key == inputs_key and not force:
                try:
                    self.check(current.info)
                except ImageError:
                    pass  # damaged: fall through and rebuild
                else:
                    report("up to date", 1.0)
                    return current.info
            workdir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
            try:
                result = builder.build(workdir, report)
                report("storing blobs", None)
                info = self._commit(name, builder.kind, inputs_key, result)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        report("done", 1.0)
        return info

    def check_new_name(self, name: str) -> None:
        """Raise unless ``name`` can be the name of a new published image."""
        if not NAME_RE.match(name):
            raise InvalidConfig(f"invalid image name {name!r}: {NAME_RULE}")
        if name in self._builders:
            raise Conflict(
                f"image name {name!r} is taken by a built-in image", hint="choose another name"
            )
        if self._manifest_path(name).exists():
            raise Conflict(
                f"an image named {name!r} already exists",
                hint=f"choose another name, or delete it: vz image delete {name}",
            )

    def publish(self, name: str, base: ImageInfo, rootfs: Path, origin: str) -> ImageInfo:
        """A new image: ``base``'s kernel and initramfs with ``rootfs`` as its disk.

        ``rootfs`` (a standalone qcow2) is moved into the store. Published images have no
        builder: they are never rebuilt, only deleted.
        """
        self.check_new_name(name)
        files = {
            role: Path(path) for role, path in base.files.items() if role not in (CMDLINE_ROLE,)
        }
        files["rootfs"] = rootfs
        result = BuildResult(
            files=files,
            kernel_release=base.kernel_release,
            cmdline=base.files.get(CMDLINE_ROLE, ""),
        )
        self._make_dirs()
        return self._commit(name, "disk", f"published:{origin}", result)

    def delete(self, name: str) -> None:
        """Remove the manifest and every blob no other manifest uses."""
        with _flock(self.root / ".lock"):
            path = self._manifest_path(name)
            if not NAME_RE.match(name) or not path.exists():
                raise NotFound(f"no image named '{name}'", hint="vz image list")
            path.unlink()
            self._gc()

    # -- internals -----------------------------------------------------------------------

    def _make_dirs(self) -> None:
        group = perms.qemu_gid(self.settings)
        mode = perms.SHARED_DIR if group is not None else perms.PRIVATE
        for d in (self.root, self.blobs_dir):
            perms.make_dir(d, mode, group)

    def _manifest_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def _read_manifest(self, name: str) -> _Manifest | None:
        if not NAME_RE.match(name):
            return None  # never let a name reach outside the store
        path = self._manifest_path(name)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"image '{name}' is corrupt: unreadable manifest {path}: {exc}",
                hint=_build_hint(name),
            ) from exc
        files = {
            role: (value if role == CMDLINE_ROLE else str(self.root / value))
            for role, value in raw["files"].items()
        }
        info = ImageInfo(
            name=raw["name"],
            digest=raw["digest"],
            kind=raw["kind"],
            kernel_release=raw["kernel_release"],
            size=raw["size"],
            created_at=datetime.fromisoformat(raw["created_at"]),
            files=files,
        )
        return _Manifest(info=info, inputs_key=raw["inputs_key"], blobs=raw.get("blobs", {}))

    def _commit(self, name: str, kind: str, inputs_key: str, result: BuildResult) -> ImageInfo:
        # Hash outside the store lock: it is the slow part for a large root disk.
        hashed = {role: (path, sha256_file(path)) for role, path in result.files.items()}
        with _flock(self.root / ".lock"):
            files: dict[str, str] = {}
            blobs: dict[str, dict[str, Any]] = {}
            for role, (path, digest) in sorted(hashed.items()):
                blob = self.blobs_dir / f"sha256-{digest}"
                size = path.stat().st_size
                if not (blob.exists() and blob.stat().st_size == size):
                    # Guest data (a published disk): QEMU's group reads it, no one else.
                    perms.share_file(path, perms.qemu_gid(self.settings), perms.BLOB)
                    os.replace(path, blob)
                files[role] = blob.relative_to(self.root).as_posix()
                blobs[role] = {"sha256": digest, "size": size}
            digest = hashlib.sha256(
                (
                    inputs_key + "".join(f"{r}={b['sha256']}" for r, b in sorted(blobs.items()))
                ).encode()
            ).hexdigest()
            if result.cmdline:
                files[CMDLINE_ROLE] = result.cmdline
            manifest = {
                "store_version": STORE_VERSION,
                "name": name,
                "digest": f"sha256:{digest}",
                "kind": kind,
                "kernel_release": result.kernel_release,
                "size": sum(b["size"] for b in blobs.values()),
                "created_at": datetime.now(UTC).isoformat(),
                "files": files,
                "inputs_key": inputs_key,
                "blobs": blobs,
            }
            tmp = self.root / f".tmp-{name}.json"
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, self._manifest_path(name))
            # The previous build's blobs may be unreferenced now.
            self._gc()
        m = self._read_manifest(name)
        assert m is not None
        return m.info

    def _referenced(self) -> set[str]:
        used: set[str] = set()
        for path in self.root.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            used.update(Path(v).name for r, v in raw.get("files", {}).items() if r != CMDLINE_ROLE)
        return used

    def _gc(self) -> None:
        # Called with the store lock held, so no commit is between moving blobs and
        # writing its manifest; any blob unreferenced now is garbage (also from killed builds).
        if not self.blobs_dir.is_dir():
            return
        used = self._referenced()
        for blob in self.blobs_dir.iterdir():
            if blob.name not in used:
                blob.unlink(missing_ok=True)

    def _clean_stale_tmp(self, name: str) -> None:
        # Called with the image's lock held: a temp dir of this image is from a killed build.
        for stale in self.root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _inputs_key(inputs: dict[str, str]) -> str:
    blob = json.dumps({"store": STORE_VERSION, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _has_magic(path: Path, magics: tuple[tuple[int, bytes], ...]) -> bool:
    with open(path, "rb") as f:
        head = f.read(0x210)
    return any(head[off : off + len(m)] == m for off, m in magics)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
