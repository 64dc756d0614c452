"""Container root file systems: an image's files unpacked into a directory, once per digest.

Containers share one read-only tree per image version and write to an overlayfs upper
layer of their own, so the tree is made once (atomically: unpacked into a temporary
directory, then renamed) and never changed afterwards. A tree stays while instances use
it even after its image is rebuilt: overlayfs cannot lose its lower layer under a mount.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from vzkit.api.instances import ImageInfo
from vzkit.errors import HostUnsupported, ImageError
from vzkit.host import perms
from vzkit.settings import Settings

_ZSTD = b"\x28\xb5\x2f\xfd"
_GZIP = b"\x1f\x8b"


def rootfs_root(settings: Settings) -> Path:
    return settings.images_dir / "rootfs"


def _key(digest: str) -> str:
    return digest.removeprefix("sha256:")[:32]


def prune_rootfs(settings: Settings, keep_digests: set[str]) -> list[Path]:
    """Remove unpacked trees of image versions no image and no instance refers to."""
    keep = {_key(d) for d in keep_digests}
    base = rootfs_root(settings)
    removed = []
    if base.is_dir():
        for tree in base.iterdir():
            if not tree.name.startswith(".") and tree.name not in keep:
                shutil.rmtree(tree, ignore_errors=True)
                removed.append(tree)
    return removed


def container_rootfs(settings: Settings, info: ImageInfo) -> Path:
    """The unpacked tree of image ``info``, made on first use."""
    key = _key(info.digest)
    base = rootfs_root(settings)
    dest = base / key
    if dest.is_dir():
        return dest
    perms.make_dir(base, perms.PRIVATE)  # image files, setuid binaries among them
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".tmp-{key}-"))
    try:
        if "rootfs" in info.files:
            _from_disk(Path(info.files["rootfs"]), tmp)
        else:
            _from_initramfs(Path(info.files["initrd"]), tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # lost a race with another unpacker: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise ImageError(
            f"{what} failed: {(proc.stderr or proc.stdout).strip()[-1000:]}",
            hint="check the image with: vz image info NAME, or rebuild it with --force",
        )


def _from_initramfs(initrd: Path, dest: Path) -> None:
    with open(initrd, "rb") as f:
        magic = f.read(4)
    if magic.startswith(_ZSTD):
        decompress = ["zstd", "-dc", "--", str(initrd)]
    elif magic.startswith(_GZIP):
        decompress = ["gzip", "-dc", "--", str(initrd)]
    else:
        decompress = ["cat", "--", str(initrd)]
    with subprocess.Popen(decompress, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as unz:
        assert unz.stdout is not None
        cpio = subprocess.run(
            ["cpio", "-idm", "--quiet"], stdin=unz.stdout, cwd=dest, capture_output=True, text=True
        )
        unz.stdout.close()
        unz_err = unz.stderr.read().decode(errors="replace") if unz.stderr else ""
    if unz.returncode != 0 or cpio.returncode != 0:
        raise ImageError(
            f"unpacking {initrd} failed: {(unz_err + cpio.stderr).strip()[-1000:]}",
            hint="check the image with: vz image info NAME, or rebuild it with --force",
        )


def _from_disk(disk: Path, dest: Path) -> None:
    """Copy the files of a qcow2 ext4 disk: convert to raw, loop-mount read-only, copy."""
    if shutil.which("qemu-img") is None:
        raise HostUnsupported("qemu-img not found", hint="apt-get install qemu-utils")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".disk-") as work:
        raw = Path(work) / "disk.raw"
        mnt = Path(work) / "mnt"
        mnt.mkdir()
        _run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], "converting the disk")
        _run(["mount", "-o", "loop,ro", str(raw), str(mnt)], "mounting the disk image")
        try:
            _run(["cp", "-a", f"{mnt}/.", str(dest)], "copying the disk's files")
        finally:
            with contextlib.suppress(Exception):
                _run(["umount", str(mnt)], "unmounting the disk image")
