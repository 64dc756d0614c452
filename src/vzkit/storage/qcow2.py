"""Typed wrappers over ``qemu-img``: every qemu-img command line is built here, as a list.

The functions are synchronous and some take long (convert, commit): the daemon runs them
with ``asyncio.to_thread``. None of them may be used on an image a running QEMU has open
for writing, except :func:`info` (and what builds on it), which passes ``-U`` (force-share):
without it qemu-img waits for nothing and fails at once on QEMU's lock.

Images are always opened as qcow2 (``-f qcow2``, or ``--image-opts driver=qcow2`` where a
subcommand has no ``-f``), never probed: probing lets whoever can write a raw image make
it look like a qcow2 whose backing file is any file on the host.

Backing files: qemu resolves a *relative* backing name against the overlay's directory,
not the caller's working directory, and stores it in the overlay as given. So pass
``Path(base.name)`` for an overlay next to its base (the pair then moves as one) or an
absolute path (the overlay then breaks if the base moves).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

from vzkit.api.bounds import NAME_RE, NAME_RULE, format_size
from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
    VzError,
)

__all__ = [
    "Snapshot",
    "actual_size",
    "backing_file",
    "check",
    "commit",
    "convert",
    "create",
    "info",
    "rebase",
    "rebase_unsafe",
    "resize",
    "snapshot_apply",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_list",
    "virtual_size",
]

FORMAT = "qcow2"
SECTOR = 512
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_ENOSPC = "No space left on device"
_IN_USE_HINT = (
    "the image is open in a running QEMU: stop the instance first (a running VM's disk "
    "changes through QMP, not qemu-img)"
)


@dataclass(frozen=True)
class Snapshot:
    """An internal qcow2 snapshot."""

    id: str
    name: str
    created: datetime
    # Non-zero for snapshots taken by QEMU's savevm, which also hold the VM's RAM.
    vm_state_size: int


# -- running qemu-img --------------------------------------------------------------------


def _not_installed() -> HostUnsupported:
    return HostUnsupported("qemu-img is not installed", hint="apt-get install qemu-utils")


def _binary() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise _not_installed()
    return path


def _p(path: Path) -> str:
    # qemu-img reads "-x" as an option and "proto:rest" as a protocol (nbd:, json:, ...);
    # "./" makes a relative name a plain file name again.
    text = str(path)
    if not path.is_absolute() and (text.startswith("-") or ":" in text.split("/", 1)[0]):
        return f"./{text}"
    return text


def _image_opts(path: Path) -> str:
    # A comma is the option separator; ",," is a literal comma.
    return f"driver={FORMAT},file.driver=file,file.filename={str(path).replace(',', ',,')}"


def _sectors(size: int) -> int:
    if size <= 0:
        raise InvalidConfig(f"invalid disk size {size}: it must be positive")
    return -(-size // SECTOR) * SECTOR


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _discard(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _need(path: Path) -> None:
    if not path.is_file():
        raise NotFound(f"disk image {path} does not exist")


def _no_space(image: Path, what: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"no space left on the file system of {image.parent} while {what}",
        hint="free some space there (or use a pool on a larger file system) and retry",
    )


def _failure(argv: list[str], stderr: str, image: Path, what: str) -> VzError:
    err = re.sub(r"^qemu-img: ", "", stderr.strip()[-2000:], flags=re.MULTILINE)
    if _ENOSPC in err:
        return _no_space(image, what)
    in_use = "Failed to get" in err and "lock" in err
    hint = _IN_USE_HINT if in_use else None
    return EngineError(
        f"qemu-img {argv[1]} failed on {image}: {err or 'no error message'}",
        hint=hint,
        command=shlex.join(argv),
    )


def _run(argv: list[str], *, image: Path, what: str, partial: Path | None = None) -> str:
    """Run qemu-img; on failure remove ``partial`` (a half-written output) and raise."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        _discard(partial)
        raise _not_installed() from exc
    if proc.returncode != 0:
        _discard(partial)
        raise _failure(argv, proc.stderr, image, what)
    return proc.stdout


def _run_progress(
    argv: list[str], *, image: Path, what: str, partial: Path, progress: Callable[[float], None]
) -> None:
    """Run ``qemu-img ... -p``, turning its "(12.34/100%)\\r" lines into fractions.

    An exception raised by ``progress`` kills qemu-img and propagates: it is how a caller
    cancels a long copy.
    """
    last = -1.0
    with tempfile.TemporaryFile() as errf:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf)
        except FileNotFoundError as exc:
            _discard(partial)
            raise _not_installed() from exc
        assert proc.stdout is not None
        try:
            buf = b""
            while chunk := os.read(proc.stdout.fileno(), 4096):
                *lines, buf = re.split(rb"[\r\n]", buf + chunk)
                for line in lines:
                    m = _PROGRESS_RE.search(line)
                    if m and (fraction := float(m.group(1)) / 100) > last:
                        last = fraction
                        progress(fraction)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            _discard(partial)
            raise
        finally:
            proc.stdout.close()
        if rc != 0:
            _discard(partial)
            errf.seek(0)
            raise _failure(argv, errf.read().decode(errors="replace"), image, what)
    if last < 1.0:
        progress(1.0)


def _publish(tmp: Path, path: Path, what: str) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        if exc.errno == errno.ENOSPC:
            raise _no_space(path, what) from exc
        raise EngineError(f"could not move {tmp} to {path} while {what}: {exc}") from exc


# -- images -------------------------------------------------------------------------------


def create(
    path: Path,
    size: int | None = None,
    *,
    backing: Path | None = None,
    backing_format: str = FORMAT,
) -> None:
    """Create a qcow2 disk of ``size`` bytes (rounded up to 512), empty and sparse.

    With ``backing``: a copy-on-write overlay over that image (``size`` may then be None,
    meaning the backing image's size). The backing name is stored as given; a relative
    one is relative to ``path``'s directory (see the module doc). An existing ``path`` is
    a Conflict: qemu-img itself would silently truncate it.
    """
    if size is None and backing is None:
        raise InvalidConfig("a new disk needs a size (or a backing image to take it from)")
    if path.exists() or path.is_symlink():
        raise Conflict(f"disk image {path} already exists", hint="delete it first")
    argv = [_binary(), "create", "-q", "-f", FORMAT]
    if backing is not None:
        base = backing if backing.is_absolute() else path.parent / backing
        if not base.is_file():
            raise NotFound(f"backing image {base} does not exist")
        argv += ["-b", _p(backing), "-F", backing_format]
    tmp = _tmp(path)
    _discard(tmp)  # left over from a crash
    argv.append(_p(tmp))
    if size is not None:
        argv.append(str(_sectors(size)))
    what = f"creating {path.name}"
    _run(argv, image=path, what=what, partial=tmp)
    _publish(tmp, path, what)


@overload
def info(path: Path, *, chain: Literal[False] = False) -> dict[str, Any]: ...
@overload
def info(path: Path, *, chain: Literal[True]) -> list[dict[str, Any]]: ...
def info(path: Path, *, chain: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """``qemu-img info`` as parsed JSON; with ``chain``, one entry per image, top first.

    Uses ``-U``, so it works on images a running QEMU holds (the figures may then be a
    moment out of date).
    """
    _need(path)
    argv = [_binary(), "info", "--output=json", "-U", "-f", FORMAT]
    if chain:
        argv.append("--backing-chain")
    argv.append(_p(path))
    result: dict[str, Any] | list[dict[str, Any]] = json.loads(
        _run(argv, image=path, what=f"reading {path.name}")
    )
    return result


def virtual_size(path: Path) -> int:
    """The disk size the guest sees."""
    return int(info(path)["virtual-size"])


def actual_size(path: Path) -> int:
    """Bytes the file occupies on the host (allocated blocks, not its length)."""
    return int(info(path)["actual-size"])


def backing_file(path: Path) -> str | None:
    """The backing name stored in the image (as given at creation), or None."""
    name = info(path).get("backing-filename")
    return None if name is None else str(name)


def resize(path: Path, size: int, *, shrink: bool = False) -> None:
    """Set the virtual size (rounded up to 512). Shrinking needs ``shrink=True``: it drops
    whatever lies past the new end, so the guest's file system must be shrunk first."""
    new = _sectors(size)
    current = virtual_size(path)
    if new == current:
        return
    if new < current and not shrink:
        raise InvalidConfig(
            f"cannot shrink {path.name} from {format_size(current)} to {format_size(new)}",
            hint="disks only grow: shrinking would discard the data past the new end",
        )
    argv = [_binary(), "resize", "-q", "-f", FORMAT]
    if new < current:
        argv.append("--shrink")
    argv += [_p(path), str(new)]
    _run(argv, image=path, what=f"resizing {path.name}")


def convert(
    src: Path,
    dst: Path,
    *,
    progress: Callable[[float], None] | None = None,
    compress: bool = False,
    src_format: str = FORMAT,
) -> None:
    """Copy ``src`` (and its whole backing chain) into one standalone qcow2 at ``dst``.

    The copy is written to ``<dst>.tmp`` and renamed over ``dst`` when complete, so a
    crash or error never leaves a partial file under the final name; on error the
    ``.tmp`` is removed too. ``progress`` gets increasing fractions, the last one 1.0.
    """
    _need(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidConfig(f"cannot convert {src} onto itself")
    tmp = _tmp(dst)
    _discard(tmp)
    argv = [_binary(), "convert", "-f", src_format, "-O", FORMAT]
    if compress:
        argv.append("-c")
    what = f"copying {src.name} to {dst.name}"
    if progress is None:
        _run([*argv, _p(src), _p(tmp)], image=dst, what=what, partial=tmp)
    else:
        argv += ["-p", _p(src), _p(tmp)]
        _run_progress(argv, image=dst, what=what, partial=tmp, progress=progress)
    _publish(tmp, dst, what)


def rebase_unsafe(path: Path, new_backing: Path | None, *, backing_format: str = FORMAT) -> None:
    """Rewrite the backing name in ``path``'s header, copying no data (``rebase -u``).

    Only correct when the new backing holds the same data as the old one (it was moved,
    renamed or copied). ``None`` detaches the overlay: clusters it never wrote then read
    as zeros. A relative name is relative to ``path``'s directory.
    """
    _rebase(path, new_backing, backing_format, ["-u"])


def rebase(path: Path, new_backing: Path | None, *, backing_format: str = FORMAT) -> None:
    """Re-point ``path`` at ``new_backing`` keeping its content: the clusters where the old
    and new backing chains differ are copied into ``path`` first (a safe rebase). ``None``
    makes ``path`` standalone. Offline only; the old backing chain must still exist."""
    _rebase(path, new_backing, backing_format, [])


def _rebase(path: Path, new_backing: Path | None, backing_format: str, mode: list[str]) -> None:
    _need(path)
    argv = [_binary(), "rebase", "-q", *mode, "-f", FORMAT]
    if new_backing is None:
        argv += ["-b", ""]
    else:
        argv += ["-b", _p(new_backing), "-F", backing_format]
    argv.append(_p(path))
    _run(argv, image=path, what=f"rebasing {path.name}")


def check(path: Path) -> bool:
    """Whether the image is consistent. Leaked clusters only waste space and count as
    consistent; corruption is False; an image that cannot be checked raises."""
    _need(path)
    argv = [_binary(), "check", "-q", "-f", FORMAT, _p(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise _not_installed() from exc
    # qemu-img check: 0 clean, 2 corrupt, 3 leaked clusters only, 1/63 could not check.
    if proc.returncode in (0, 3):
        return True
    if proc.returncode == 2:
        return False
    raise _failure(argv, proc.stderr, path, f"checking {path.name}")


def commit(top: Path) -> None:
    """Write the overlay ``top``'s clusters into its backing image, then empty ``top``.

    The backing image changes in place: any *other* overlay over it is corrupted by this,
    so only commit into a base that ``top`` alone uses. If this fails part-way (no space),
    ``top`` still holds all its data and the commit can be run again.
    """
    if backing_file(top) is None:
        raise InvalidConfig(f"{top.name} has no backing image to commit into")
    argv = [_binary(), "commit", "-q", "-f", FORMAT, _p(top)]
    _run(argv, image=top, what=f"committing {top.name}")


# -- internal snapshots ------------------------------------------------------------------


def snapshot_list(path: Path) -> list[Snapshot]:
    """The image's internal snapshots, oldest first."""
    return [
        Snapshot(
            id=str(s["id"]),
            name=str(s["name"]),
            created=datetime.fromtimestamp(int(s["date-sec"]), UTC),
            vm_state_size=int(s.get("vm-state-size", 0)),
        )
        for s in info(path).get("snapshots", [])
    ]


def _check_snapshot_name(name: str) -> None:
    # qemu matches a snapshot argument against ids as well as names, so a name made of
    # digits could pick another snapshot whose id it equals.
    if not NAME_RE.match(name) or name.isdigit():
        raise InvalidConfig(f"invalid snapshot name {name!r}: {NAME_RULE}, and not only digits")


def _existing(path: Path, name: str) -> None:
    names = [s.name for s in snapshot_list(path)]
    if name not in names:
        raise NotFound(
            f"disk {path.name} has no snapshot {name!r}",
            hint=f"its snapshots: {', '.join(names)}" if names else "it has no snapshots",
        )


def _snapshot(path: Path, flag: str, name: str, what: str) -> None:
    argv = [_binary(), "snapshot", "-q", flag, name, "--image-opts", _image_opts(path)]
    _run(argv, image=path, what=what)


def snapshot_create(path: Path, name: str) -> None:
    """Take a disk-only internal snapshot (the image must not be in use)."""
    _check_snapshot_name(name)
    # qemu-img happily makes two snapshots of the same name; only the first is reachable.
    if any(s.name == name for s in snapshot_list(path)):
        raise Conflict(f"disk {path.name} already has a snapshot {name!r}")
    _snapshot(path, "-c", name, f"snapshotting {path.name}")


def snapshot_apply(path: Path, name: str) -> None:
    """Revert the disk to the snapshot; what was written since is lost."""
    _existing(path, name)
    _snapshot(path, "-a", name, f"restoring {path.name} to {name}")


def snapshot_delete(path: Path, name: str) -> None:
    _existing(path, name)
    _snapshot(path, "-d", name, f"deleting snapshot {name} of {path.name}")
