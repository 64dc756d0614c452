"""Per-container state on disk: ``<root>/<id>/state.json`` plus ``exec.fifo``.

The status is never stored: it is derived from the live system each time (is the init
alive with the recorded start time, is the exec fifo still there, is the cgroup frozen),
so a crashed runtime or a reboot cannot leave a stale "running" behind.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import NotFound
from vzkit_runtime.spec import OCI_VERSION

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any

    from vzkit_runtime.spec import Json

DEFAULT_ROOT = "/run/vz-runtime"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
FIFO = "exec.fifo"


def container_dir(root: str, container_id: str) -> str:
    return os.path.join(root, container_id)


def proc_start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks, state letter) from /proc/PID/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[19]), fields[0].decode()


def alive(pid: int, start_time: int) -> bool:
    """The recorded process still runs: not reaped, not a zombie, not a reused pid."""
    if pid <= 0:
        return False
    info = proc_start_time(pid)
    return info is not None and info[0] == start_time and info[1] not in ("Z", "X")


class State:
    """What create records; everything else about a container is looked up live."""

    __slots__ = ("cdir", "data", "id")

    def __init__(self, cdir: str, container_id: str, data: Json) -> None:
        self.cdir = cdir
        self.id = container_id
        self.data = data

    @property
    def pid(self) -> int:
        return int(self.data.get("pid") or 0)

    @property
    def bundle(self) -> str:
        return str(self.data.get("bundle", ""))

    @property
    def fifo(self) -> str:
        return os.path.join(self.cdir, FIFO)

    def procs_files(self) -> list[str]:
        return [str(p) for p in self.data.get("cgroupProcs") or []]

    def frozen(self) -> bool:
        path = self.data.get("freezer")
        if not path:
            return False
        from vzkit_runtime.cgroups import is_frozen

        return is_frozen(path)

    def status(self) -> str:
        if not self.data.get("created"):
            # The init may already exist (hooks run at this point) but is not set up yet.
            return "creating" if alive(self.pid, self.data.get("startTime", -1)) else "stopped"
        if not alive(self.pid, int(self.data.get("startTime", -1))):
            return "stopped"
        if os.path.exists(self.fifo):
            return "created"
        return "paused" if self.frozen() else "running"

    def oci(self, status: str | None = None) -> Json:
        """The state object of runtime-spec (runtime.md#state)."""
        status = status or self.status()
        out: Json = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": status,
            "pid": self.pid if status in ("created", "running", "paused", "creating") else 0,
            "bundle": self.bundle,
            "annotations": self.data.get("annotations") or {},
        }
        created = self.data.get("created_at")
        if created:
            out["created"] = created
        return out

    def config(self) -> Json:
        """The config.json create ran with (a copy: the bundle may have changed since)."""
        with open(os.path.join(self.cdir, CONFIG_FILE), "rb") as f:
            spec: Json = json.loads(f.read())
        return spec

    def save(self) -> None:
        write_atomic(os.path.join(self.cdir, STATE_FILE), json.dumps(self.data).encode())


def write_atomic(path: str, data: bytes, *, unique: bool = False) -> None:
    """Write to a temporary file and rename it over ``path``; ``unique``: a temporary name
    of its own per process, for files that several processes may write at once."""
    tmp = f"{path}.{os.getpid()}.tmp" if unique else f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def remove_tree(path: str) -> None:
    """rm -rf for a state directory (shutil costs an import for this one call)."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def load(root: str, container_id: str) -> State:
    cdir = container_dir(root, container_id)
    try:
        with open(os.path.join(cdir, STATE_FILE), "rb") as f:
            data: dict[str, Any] = json.loads(f.read())
    except FileNotFoundError:
        if os.path.isdir(cdir):
            # create is still between mkdir and its first state write.
            return State(cdir, container_id, {"id": container_id})
        raise NotFound(
            f"container {container_id!r} does not exist",
            hint=f"`vz-runtime --root {root} list` shows the containers",
        ) from None
    except ValueError as exc:
        raise NotFound(f"container {container_id!r} has a corrupt state file: {exc}") from None
    return State(cdir, container_id, data)


def list_ids(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    # Dot names are the runtime's own (.cache), not containers.
    return sorted(
        n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
    )
