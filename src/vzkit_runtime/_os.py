"""The ``os`` the runtime uses, without importing ``os``.

``import os`` executes about 4 million instructions (its module, posixpath, stat and the
ABCs of _collections_abc for os.environ): a tenth of what ``vz-runtime run`` executes in
its own process. Everything the runtime calls except the path helpers is the C module
``posix`` already loaded at start-up, which ``os`` re-exports; this module re-exports it
too and adds the few helpers of os/os.path the runtime needs, for POSIX paths as ``str``.
Modules use it as ``from vzkit_runtime import _os as os``; ``os.path`` holds the path
functions (a class of static methods: cheaper to make than a module to import).
"""

from __future__ import annotations

import _stat
from posix import *  # noqa: F403 - posix is what os re-exports on Linux
from posix import _exit as _exit
from posix import fspath, getcwd, lstat, mkdir, readlink, scandir, stat

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Iterator
    from os import PathLike as PathLike


sep = "/"
_MAX_LINKS = 255
_ELOOP = 40


def fsencode(name: str | bytes | PathLike[str]) -> bytes:
    value = fspath(name)
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def join(a: str | PathLike[str], *rest: str | PathLike[str]) -> str:
    out = fspath(a)
    for part in rest:
        b = fspath(part)
        if b.startswith("/"):
            out = b
        elif not out or out.endswith("/"):
            out += b
        else:
            out += "/" + b
    return out


def split(name: str | PathLike[str]) -> tuple[str, str]:
    p = fspath(name)
    i = p.rfind("/") + 1
    head, tail = p[:i], p[i:]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head, tail


def dirname(p: str | PathLike[str]) -> str:
    return split(p)[0]


def basename(p: str | PathLike[str]) -> str:
    return split(p)[1]


def normpath(name: str | PathLike[str]) -> str:
    """Lexically: no ``.``, ``..`` folded into its parent, single slashes (POSIX keeps a
    leading ``//``, as posixpath does)."""
    p = fspath(name)
    if not p:
        return "."
    initial = 2 if p.startswith("//") and not p.startswith("///") else int(p.startswith("/"))
    parts: list[str] = []
    for comp in p.split("/"):
        if comp in ("", "."):
            continue
        if comp != ".." or (not initial and not parts) or (parts and parts[-1] == ".."):
            parts.append(comp)
        elif parts:
            parts.pop()
    return "/" * initial + "/".join(parts) or "."


def abspath(name: str | PathLike[str]) -> str:
    p = fspath(name)
    return normpath(p if p.startswith("/") else join(getcwd(), p))


def relpath(p: str | PathLike[str], start: str | PathLike[str]) -> str:
    target = [c for c in abspath(p).split("/") if c]
    base = [c for c in abspath(start).split("/") if c]
    common = 0
    while common < min(len(target), len(base)) and target[common] == base[common]:
        common += 1
    return "/".join([".."] * (len(base) - common) + target[common:]) or "."


def resolve(root: str, name: str, *, strict: bool = False) -> str:
    """``name`` as a process whose root is ``root`` sees it, as a path under ``root``:
    symlinks followed with ``root`` as ``/`` (absolute targets restart there, ``..``
    never climbs above it); what does not exist is kept as written. ``strict``: a link
    loop (over 255 links) or a file used as a directory raises OSError; else the rest of
    the path is kept as written from there, as posixpath.realpath does."""
    prefix = "" if root == "/" else root
    pending = name.split("/")[::-1]
    parts: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        full = prefix + "/" + "/".join([*parts, part])
        try:
            is_link = _stat.S_ISLNK(lstat(full).st_mode)
        except FileNotFoundError:
            is_link = False
        except NotADirectoryError:
            if strict:
                raise
            is_link = False
        if is_link and links >= _MAX_LINKS:
            if strict:
                raise OSError(_ELOOP, "too many levels of symbolic links", name)
            is_link = False
        if not is_link:
            parts.append(part)
            continue
        links += 1
        target = readlink(full)
        if target.startswith("/"):
            parts.clear()
        pending.extend(target.split("/")[::-1])
    return prefix + "/" + "/".join(parts) if parts else root


def realpath(p: str | PathLike[str]) -> str:
    name = fspath(p)
    # Not abspath: ".." must apply to what a link resolved to, not be folded lexically.
    return resolve("/", name if name.startswith("/") else getcwd() + "/" + name)


def _mode(p: str | PathLike[str], follow: bool = True) -> int | None:
    try:
        return (stat(p) if follow else lstat(p)).st_mode
    except (OSError, ValueError):
        return None


def exists(p: str | PathLike[str]) -> bool:
    return _mode(p) is not None


def lexists(p: str | PathLike[str]) -> bool:
    return _mode(p, follow=False) is not None


def isdir(p: str | PathLike[str]) -> bool:
    mode = _mode(p)
    return mode is not None and _stat.S_ISDIR(mode)


def isfile(p: str | PathLike[str]) -> bool:
    mode = _mode(p)
    return mode is not None and _stat.S_ISREG(mode)


def islink(p: str | PathLike[str]) -> bool:
    mode = _mode(p, follow=False)
    return mode is not None and _stat.S_ISLNK(mode)


def getsize(p: str | PathLike[str]) -> int:
    return stat(p).st_size


def makedirs(name: str, mode: int = 0o777, exist_ok: bool = False) -> None:
    parent = dirname(name.rstrip("/"))
    if parent and parent != name and not exists(parent):
        makedirs(parent, mode, exist_ok=True)
    try:
        mkdir(name, mode)
    except FileExistsError:
        if not exist_ok or not isdir(name):
            raise


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk, top-down, not following links, silent on errors."""
    try:
        entries = list(scandir(top))
    except OSError:
        return
    dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    subdirs = set(dirs)
    yield top, dirs, [e.name for e in entries if e.name not in subdirs]
    for name in dirs:
        yield from walk(join(top, name))


class path:
    """The os.path functions the runtime uses."""

    join = staticmethod(join)
    split = staticmethod(split)
    dirname = staticmethod(dirname)
    basename = staticmethod(basename)
    normpath = staticmethod(normpath)
    abspath = staticmethod(abspath)
    relpath = staticmethod(relpath)
    realpath = staticmethod(realpath)
    exists = staticmethod(exists)
    lexists = staticmethod(lexists)
    isdir = staticmethod(isdir)
    isfile = staticmethod(isfile)
    islink = staticmethod(islink)
    getsize = staticmethod(getsize)
