"""Starting QEMU as a process that outlives the daemon, and finding it again.

QEMU is started with ``-daemonize``: the launcher process returns once QEMU finished its
set-up (so a bad command line or a missing file fails the launch synchronously), and the
real QEMU process belongs to no one but init, so killing vzd never kills a VM. Exit is
observed through a pidfd, which works for processes that are not our children.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzkit._proc import alive
from vzkit.errors import EngineError
from vzkit.host import safefs

# Enough for QEMU to load a kernel and initramfs from a slow disk, not enough to hide a hang.
LAUNCH_TIMEOUT = 60.0


def listen_unix(path: Path) -> socket.socket:
    """A listening socket QEMU inherits, so clients can connect before QEMU even runs."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class Jail:
    """What QEMU sees of vzkit's directories: ``hide`` are covered with empty tmpfs, then
    ``keep`` (path, read-only) are mounted back at their own paths, so the command line's
    paths still work and nothing else of vzkit's state is visible: not another instance's
    disks or sockets, not the database."""

    hide: tuple[Path, ...]
    keep: tuple[tuple[Path, bool], ...]
    # Run QEMU as this user (uid, gid), its supplementary groups included, no capabilities.
    user: tuple[int, int] | None = None


# Joins the cgroups (before exec, so every byte QEMU allocates is accounted); then, in the
# private mount namespace `unshare` made, parks what the jail keeps on a scratch directory
# (bind mounts, taken while the paths are still visible), covers the hidden directories
# and moves the parked mounts back into place.
_LAUNCH = r"""
set -e
n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done
[ "$1" = 0 ] && { shift; exec "$@"; }
stage=$(mktemp -d /dev/shm/.vz-jail.XXXXXX)
trap 'rm -rf "$stage"' EXIT
hides=$1; shift; i=0; set -- "$@"
while [ "$i" -lt "$hides" ]; do eval "hide_$i=\$1"; shift; i=$((i+1)); done
keeps=$1; shift; i=0
while [ "$i" -lt "$keeps" ]; do
  eval "path_$i=\$1 ro_$i=\$2"; shift 2
  if [ -d "$(eval echo \"\$path_$i\")" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  eval mount --bind \"\$path_$i\" \"$stage/$i\"
  i=$((i+1))
done
i=0
while [ "$i" -lt "$hides" ]; do
  eval mount -t tmpfs -o mode=0755,size=1m vz-jail \"\$hide_$i\"; i=$((i+1))
done
i=0
while [ "$i" -lt "$keeps" ]; do
  eval "target=\$path_$i ro=\$ro_$i"
  if [ -d "$stage/$i" ]; then mkdir -p "$target"; else mkdir -p "${target%/*}"; : > "$target"; fi
  mount --move "$stage/$i" "$target"
  [ "$ro" = 1 ] && mount -o remount,bind,ro "$target"
  i=$((i+1))
done
rm -rf "$stage"; trap - EXIT
exec "$@"
"""


def _wrapper(procs_files: Sequence[Path], jail: Jail | None, argv: Sequence[str]) -> list[str]:
    if not procs_files and jail is None:
        return list(argv)
    args = [str(len(procs_files)), *map(str, procs_files)]
    if jail is None:
        return ["/bin/sh", "-c", _LAUNCH, "vz-launch", *args, "0", *argv]
    args += [str(len(jail.hide)), *map(str, jail.hide), str(len(jail.keep))]
    for path, ro in jail.keep:
        args += [str(path), "1" if ro else "0"]
    if jail.user is not None:
        uid, gid = jail.user
        argv = [
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--", *argv,
        ]  # fmt: skip
    shell = ["/bin/sh", "-c", _LAUNCH, "vz-launch", *args, *argv]
    return ["unshare", "--mount", "--propagation", "private", *shell]


async def launch(
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int],
    procs_files: Sequence[Path],
    pid_file: Path,
    log_file: Path,
    jail: Jail | None = None,
) -> int:
    """Run QEMU (with -daemonize) and return the pid of the daemonized process."""
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    # (never through a link: the runtime dir is QEMU's user's)
    log_fd = safefs.open_file(
        log_file.parent, log_file.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    with os.fdopen(log_fd, "ab") as log:
        start = log.tell()
        try:
            proc = await asyncio.create_subprocess_exec(
                *_wrapper(procs_files, jail, argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                pass_fds=pass_fds,
            )
        except FileNotFoundError as exc:
            raise EngineError(
                f"cannot run {argv[0]}: not found",
                hint="install QEMU: apt-get install qemu-system-x86 (scripts/setup does this)",
            ) from exc
        try:
            rc = await asyncio.wait_for(proc.wait(), LAUNCH_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise EngineError(
                f"QEMU did not finish starting within {LAUNCH_TIMEOUT:.0f}s",
                hint=f"see {log_file}",
            ) from None
    if rc != 0:
        status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        message = _tail(log_file, start).strip() or status
        raise EngineError(f"QEMU failed to start: {message}", hint=f"see {log_file}")
    try:
        return int(safefs.read_text(pid_file.parent, pid_file.name, 64).strip())
    except (OSError, ValueError) as exc:
        raise EngineError(f"QEMU started but wrote no pid file at {pid_file}") from exc


def _tail(path: Path, start: int, limit: int = 4000) -> str:
    return safefs.read_tail(path.parent, path.name, limit, start).decode(errors="replace")


def cmdline_of(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_our_qemu(pid: int, uuid: str) -> bool:
    """True when pid is alive and is the QEMU started for this instance uuid."""
    argv = cmdline_of(pid)
    return argv is not None and "-uuid" in argv and uuid in argv


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until pid has exited (it is not our child, so we cannot waitpid it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return not alive(pid)


@contextlib.contextmanager
def closing_all(socks: Sequence[socket.socket]) -> Iterator[None]:
    try:
        yield
    finally:
        for s in socks:
            s.close()
