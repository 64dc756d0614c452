"""Unpacking an export archive that nobody vouches for: ``python -m vzkit.storage.unpack``.

vzd runs this module as a child process fed the archive on its stdin, so the archive is
parsed off the daemon's event loop and in a process whose address space is capped
(``RLIMIT_AS``): a crafted header of any size fails here with a clear error rather than
growing vzd. It imports only the standard library, so it starts quickly.

What is created, and how (the rules of an import):

- Only ``vzkit-export.json`` (a regular file of at most ``HEADER_MAX`` bytes) and members
  below ``instance/`` are accepted; a name that is absolute, holds ``..`` or repeats an
  earlier member is refused.
- Outside a container's own files (the ``--owned`` trees: its upper layer and each
  snapshot's copy of it) only regular files and directories are accepted, without setuid,
  setgid, sticky or world-writable bits; their owner is root, whatever the archive says,
  and their extended attributes are dropped.
- Inside a container's own files the container's file system is kept as it was: owners,
  modes (setuid included), extended attributes (overlayfs' ``trusted.overlay.*``,
  file capabilities), symbolic links, FIFOs, overlay whiteouts (character device 0:0) and
  hard links to an earlier regular file of the same tree. Any other device is refused.
- Every member is created below a directory fd with ``O_NOFOLLOW`` / ``*at`` calls
  (``vzkit.host.safefs``) and nothing is opened through a link, so a symlink member can
  never redirect a later one (``upper/etc -> /etc`` then ``upper/etc/passwd`` fails).
- Sparse members stay sparse (only their data is written); every member's size and the
  sum of all sizes are capped (``--max-member``, ``--max-total``: sizes as files, holes
  included).

A refusal is printed as one line of JSON (``{"error": ..., "hint": ...}``) on stderr and
the exit status is 2; the caller removes the half-made directory.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import resource
import stat
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from vzkit.host import safefs

HEADER = "vzkit-export.json"
HEADER_MAX = 1 << 20
FILES = "instance"
# The unpacker's own memory: tarfile holds one member's headers at a time.
ADDRESS_SPACE = 1 << 30
_CHUNK = 1 << 20
_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH


class Refused(Exception):
    def __init__(self, message: str, hint: str = "", *, too_large: bool = False) -> None:
        super().__init__(message)
        self.hint = hint or "is it a complete file made by vz export?"
        self.too_large = too_large


@dataclass
class Unpacker:
    dest: int  # fd of the (empty) directory to unpack into
    owned: tuple[str, ...]  # glob patterns of the trees a container owns, e.g. instance/upper
    max_member: int
    max_total: int
    total: int = 0
    seen: set[str] = field(default_factory=set)
    regular: dict[str, str] = field(default_factory=dict)  # owned regular file -> its tree
    dirs: list[tuple[str, int]] = field(default_factory=list)

    def run(self, stream: IO[bytes]) -> None:
        try:
            with tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tf:
                while (member := tf.next()) is not None:
                    # tarfile keeps every member it read; a stream's need not be kept.
                    tf.members.clear()  # type: ignore[attr-defined]  # (missing in typeshed)
                    self.member(tf, member)
        except tarfile.TarError as exc:
            raise Refused(f"the archive could not be unpacked: {exc}") from exc
        except MemoryError as exc:
            raise Refused("the archive has a header too large to read") from exc
        # Directories last, deepest first: their children changed their times.
        for rel, mtime in reversed(self.dirs):
            fd = safefs.open_at(self.dest, rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        if m.name in (".", "./") and m.isdir():
            return  # the archive's own top (tar -C DIR -cf - .): nothing to make
        rel = _name(m.name)
        if rel in self.seen:
            raise Refused(f"archive member {rel!r} appears twice")
        self.seen.add(rel)
        if rel != HEADER and not rel.startswith(f"{FILES}/") and rel != FILES:
            raise Refused(f"unexpected archive member {rel!r}")
        if rel == HEADER and (not m.isreg() or m.size > HEADER_MAX):
            raise Refused(f"{HEADER} is not a regular file of at most {HEADER_MAX} bytes")
        if rel == FILES and not m.isdir():
            raise Refused(f"{FILES} is not a directory")
        if m.size > self.max_member or m.size < 0:
            raise Refused(
                f"archive member {rel!r} is larger than {self.max_member} bytes", too_large=True
            )
        self.total += m.size if m.isreg() else 0
        if self.total > self.max_total:
            raise Refused(
                f"the archive unpacks to more than {self.max_total} bytes", too_large=True
            )
        tree = self.tree(rel)
        if tree is None:
            self.plain(tf, m, rel)
        else:
            self.owned_member(tf, m, rel, tree)

    def tree(self, rel: str) -> str | None:
        """The container-owned tree ``rel`` is strictly inside, if any."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            top = "/".join(parts[:i])
            if any(fnmatch.fnmatchcase(top, p) for p in self.owned):
                return top
        return None

    def plain(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str) -> None:
        if not (m.isreg() or m.isdir()):
            raise Refused(
                f"archive member {rel!r} is a {_kind(m)}: only regular files and directories "
                "are accepted outside a container's own files",
                hint="refusing it: a link or a device there could reach this host's files",
            )
        if m.mode & _SPECIAL:
            raise Refused(
                f"archive member {rel!r} has mode {m.mode:o} (setuid, setgid, sticky or "
                "world-writable)",
                hint="refusing it: such modes are accepted only in a container's own files",
            )
        self.create(tf, m, rel, owned=False)

    def owned_member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, tree: str) -> None:
        if m.islnk():
            self.hard_link(m, rel, tree)
        elif (m.ischr() and (m.devmajor, m.devminor) != (0, 0)) or m.isblk():
            raise Refused(
                f"archive member {rel!r} is a device ({m.devmajor}:{m.devminor}): only overlay "
                "whiteouts (character device 0:0) are accepted in a container's files",
                hint="refusing it: a device node would open host hardware",
            )
        elif m.isreg() or m.isdir() or m.issym() or m.ischr() or m.isfifo():
            self.create(tf, m, rel, owned=True)
            if m.isreg():
                self.regular[rel] = tree
        else:
            raise Refused(f"archive member {rel!r} has an unknown type {m.type!r}")

    def create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, owned: bool) -> None:
        try:
            with safefs.parent(self.dest, rel) as (pfd, name):
                self._create_at(tf, m, pfd, name, rel, owned)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise Refused(f"archive member {rel!r} goes through a link") from exc
            if exc.errno == errno.ENOENT:
                raise Refused(f"archive member {rel!r} comes before its directory") from exc
            if exc.errno == errno.EEXIST:
                raise Refused(f"archive member {rel!r} would replace another") from exc
            raise

    def _create_at(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: str, rel: str, owned: bool
    ) -> None:
        mode = stat.S_IMODE(m.mode)
        if m.isdir():
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            self.dirs.append((rel, int(m.mtime)))
        elif m.isreg():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=pfd)
            try:
                _write_data(tf, m, fd)
            except BaseException:
                os.close(fd)
                raise
        else:  # owned only: a link, a whiteout or a FIFO, set up through its parent fd
            if m.issym():
                os.symlink(m.linkname, name, dir_fd=pfd)
            else:
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFIFO
                os.mknod(name, mode | kind, 0, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            if not m.issym():
                os.chmod(name, mode, dir_fd=pfd)  # the node just made, in our own directory
            _set_xattrs(f"/proc/self/fd/{pfd}/{name}", m)
            os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            return
        try:
            if owned:
                os.fchown(fd, m.uid, m.gid)  # before the mode: chown clears setuid
                _set_xattrs(fd, m)
            os.fchmod(fd, mode)
            if m.isreg():
                os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)

    def hard_link(self, m: tarfile.TarInfo, rel: str, tree: str) -> None:
        target = _name(m.linkname)
        if self.regular.get(target) != tree:
            raise Refused(
                f"archive member {rel!r} is a hard link to {target!r}, which is not an earlier "
                "regular file of the same container's files",
                hint="refusing it: a hard link could share a file outside the container",
            )
        try:
            with (
                safefs.parent(self.dest, target) as (tfd, tname),
                safefs.parent(self.dest, rel) as (lfd, lname),
            ):
                os.link(tname, lname, src_dir_fd=tfd, dst_dir_fd=lfd, follow_symlinks=False)
        except OSError as exc:
            raise Refused(f"archive member {rel!r} could not be linked: {exc}") from exc


def _name(raw: str) -> str:
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if raw.startswith("/") or ".." in parts or not parts or "\0" in raw:
        raise Refused(f"archive member name {raw!r} leaves the archive")
    return "/".join(parts)


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link (to {m.linkname!r})"
    if m.islnk():
        return f"hard link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return f"device ({m.devmajor}:{m.devminor})"
    return "FIFO" if m.isfifo() else f"member of type {m.type!r}"


def _write_data(tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
    """The member's data into ``fd``: a sparse member's data regions only, at their offsets
    (read straight from the stream, where they follow each other), holes left as holes."""
    src = tf.fileobj
    assert src is not None
    # typeshed calls it list[int]: it is (offset, size) pairs
    regions = cast(list[tuple[int, int]], m.sparse if m.sparse is not None else [(0, m.size)])
    src.seek(m.offset_data)  # forward only: the stream is where the header ended
    end = 0
    for offset, length in regions:
        if length == 0:
            continue  # the old GNU format pads its map with (0, 0) entries
        if offset < end or length < 0 or offset + length > m.size:
            raise Refused(f"archive member {m.name!r} has a bad sparse map")
        end = offset + length
        while length:
            chunk = src.read(min(_CHUNK, length))
            if not chunk:
                raise Refused("the archive ends in the middle of a file")
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)
            length -= len(chunk)
    os.ftruncate(fd, m.size)


def _set_xattrs(target: int | str, m: tarfile.TarInfo) -> None:
    """The member's extended attributes on an fd, or on a path whose last component is
    not followed (a link's own attributes)."""
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            raw = value.encode("utf-8", "surrogateescape")
            attr = key.removeprefix("SCHILY.xattr.")
            if isinstance(target, int):
                os.setxattr(target, attr, raw)
            else:
                os.setxattr(target, attr, raw, follow_symlinks=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dest", required=True, help="an empty directory to unpack into")
    p.add_argument("--owned", action="append", default=[], help="a container-owned tree glob")
    p.add_argument("--max-member", type=int, required=True)
    p.add_argument("--max-total", type=int, required=True)
    args = p.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    dest = safefs.open_dir(Path(args.dest))
    try:
        Unpacker(dest, tuple(args.owned), args.max_member, args.max_total).run(sys.stdin.buffer)
    except Refused as exc:
        refusal = {"error": str(exc), "hint": exc.hint, "too_large": exc.too_large}
        print(json.dumps(refusal), file=sys.stderr)
        return 2
    finally:
        os.close(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
