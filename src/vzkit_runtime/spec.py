"""The OCI bundle: loading and checking config.json, the default spec, runtime features.

Plain dicts, not models: the runtime imports this on every call and must start fast, and
config.json has many optional, extensible parts that the runtime passes through untouched.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import Conflict, InvalidConfig, NotFound

# typing costs milliseconds to import and vz-runtime's start-up is its main cost: the
# names below exist for mypy only (mypy treats any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Json = dict[str, Any]

OCI_VERSION = "1.0.2"
OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = "1.2.0"

# The OCI namespace types this runtime knows (same keys as syscalls.NAMESPACES; repeated
# here so validation does not load ctypes).
NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")

_NS_FILE = {"network": "net", "mount": "mnt"}

HOOK_TYPES = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)

DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]

READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

MOUNT_OPTIONS = [
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "unbindable",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def check_id(container_id: str) -> None:
    """runc's rule: ^[\\w+-\\.]+$, and not '.' or '..' (it names a directory)."""
    ok = bool(container_id) and container_id not in (".", "..")
    if ok:
        ok = all(c.isalnum() or c in "_+-." for c in container_id) and container_id.isascii()
    if not ok:
        raise InvalidConfig(
            f"invalid container id {container_id!r}",
            hint="use letters, digits and _ + - . only",
        )


def load_bundle(bundle: str) -> tuple[Json, str]:
    """Read ``bundle``/config.json; returns the spec and the absolute rootfs path."""
    spec, rootfs, _raw = read_bundle(bundle)
    return spec, rootfs


def read_bundle(bundle: str) -> tuple[Json, str, bytes]:
    """:func:`load_bundle` plus the file's bytes (create keeps a copy without re-encoding)."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise NotFound(
            f"no config.json in bundle {bundle}",
            hint="create one with `vz-runtime spec --bundle DIR` and edit it",
        ) from None
    except OSError as exc:
        raise InvalidConfig(f"cannot read {path}: {exc.strerror}") from exc
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise InvalidConfig(
            f"malformed {path}: {exc}", hint="config.json must be one JSON object"
        ) from None
    if not isinstance(spec, dict):
        raise InvalidConfig(f"malformed {path}: the top level must be a JSON object")
    return spec, validate(spec, bundle), raw


def _section(spec: Json, key: str, where: str = "") -> Json:
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidConfig(f"{where}{key} must be a JSON object")
    return value


def validate(spec: Json, bundle: str) -> str:
    """Check what create depends on; returns the absolute rootfs path."""
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise InvalidConfig(
            f"unsupported ociVersion {version!r}",
            hint=f"this runtime implements runtime-spec {OCI_VERSION_MIN}..{OCI_VERSION_MAX}",
        )
    root = _section(spec, "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise InvalidConfig("root.path is missing", hint='set "root": {"path": "rootfs"}')
    rootfs = os.path.join(os.path.abspath(bundle), root_path)
    if not os.path.isdir(rootfs):
        raise NotFound(
            f"rootfs {rootfs} does not exist or is not a directory",
            hint="unpack the image's filesystem there, or fix root.path",
        )
    process = _section(spec, "process")
    args = process.get("args")
    if not process or not isinstance(args, list) or not args:
        raise InvalidConfig("process.args is missing or empty", hint='set e.g. ["sh"]')
    if not all(isinstance(a, str) for a in args):
        raise InvalidConfig("process.args must be strings")
    oom = process.get("oomScoreAdj")
    if oom is not None and (isinstance(oom, bool) or not isinstance(oom, int) or abs(oom) > 1000):
        raise InvalidConfig(f"process.oomScoreAdj {oom!r} is not an integer in -1000..1000")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidConfig(f"process.cwd {cwd!r} must be an absolute path")
    linux = _section(spec, "linux")
    seen: set[str] = set()
    for ns in linux.get("namespaces") or []:
        kind = ns.get("type") if isinstance(ns, dict) else None
        if kind not in NAMESPACE_TYPES:
            raise InvalidConfig(
                f"unknown namespace type {kind!r} in linux.namespaces",
                hint=f"use one of: {', '.join(NAMESPACE_TYPES)}",
            )
        if kind in seen:
            raise InvalidConfig(f"namespace {kind!r} listed twice in linux.namespaces")
        seen.add(kind)
        path = ns.get("path")
        if path is not None and not os.path.exists(path):
            raise NotFound(f"namespace path {path} ({kind}) does not exist")
    if "mount" not in seen:
        _check_without_mount_ns(linux)
    if "user" not in seen and (linux.get("uidMappings") or linux.get("gidMappings")):
        raise InvalidConfig(
            "linux.uidMappings/gidMappings need a user namespace",
            hint='add {"type": "user"} to linux.namespaces',
        )
    hooks = _section(spec, "hooks")
    for kind, entries in hooks.items():
        if kind not in HOOK_TYPES:
            raise InvalidConfig(f"unknown hook type {kind!r}", hint=", ".join(HOOK_TYPES))
        for hook in entries or []:
            if not isinstance(hook, dict) or not str(hook.get("path", "")).startswith("/"):
                raise InvalidConfig(f"hooks.{kind}: each hook needs an absolute path")
    return rootfs


def _check_without_mount_ns(linux: Json) -> None:
    """Without a mount namespace the container shares the runtime's mounts: what would
    change them changes the host's (runc refuses masked and read-only paths the same way;
    sysctls would be written through the host's /proc/sys)."""
    for key in ("maskedPaths", "readonlyPaths", "sysctl"):
        if linux.get(key):
            raise InvalidConfig(
                f"linux.{key} needs a mount namespace of the container's own",
                hint=f'add {{"type": "mount"}} to linux.namespaces, or drop linux.{key}',
            )


def without_mount_ns_ignored(spec: Json) -> list[str]:
    """What a config without a mount namespace sets that then does nothing."""
    linux = spec.get("linux") or {}
    found = [k for k in ("mounts",) if spec.get(k)]
    found += [f"linux.{k}" for k in ("devices", "rootfsPropagation") if linux.get(k)]
    if (spec.get("root") or {}).get("readonly"):
        found.append("root.readonly")
    return found


def namespaces(spec: Json) -> dict[str, str | None]:
    """OCI type -> path to join (None: create a new one)."""
    out: dict[str, str | None] = {}
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        out[ns["type"]] = ns.get("path")
    return out


def ensure_absent(state_dir: str, container_id: str) -> None:
    if os.path.lexists(state_dir):
        raise Conflict(
            f"container {container_id!r} already exists",
            hint=f"pick another id, or `vz-runtime delete {container_id}` first",
        )


# ---------------------------------------------------------------------------- defaults


def default_spec(*, rootless: bool = False) -> Json:
    """The config.json `vz-runtime spec` writes: runc's default, with Docker's caps."""
    from vzkit_runtime import seccomp

    caps = list(DEFAULT_CAPS)
    mounts: list[Json] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
            + ([] if rootless else ["gid=5"]),
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
    ]
    namespaces: list[Json] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    linux: Json = {
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
        "seccomp": seccomp.default_profile(),
    }
    if rootless:
        mounts.append(
            {
                "destination": "/sys",
                "type": "none",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            }
        )
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": os.getuid(), "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": os.getgid(), "size": 1}]
    else:
        mounts.append(
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            }
        )
        mounts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            }
        )
        namespaces[1:1] = [{"type": "network"}]
        namespaces.append({"type": "cgroup"})
        linux["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
    linux["namespaces"] = namespaces
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [f"PATH={DEFAULT_PATH}", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "vz",
        "mounts": mounts,
        "linux": linux,
    }


def features() -> Json:
    """What this runtime supports, per runtime-spec features.md."""
    from vzkit_runtime import caps

    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "hooks": list(HOOK_TYPES),
        "mountOptions": sorted(MOUNT_OPTIONS),
        "linux": {
            "namespaces": [
                t for t in NAMESPACE_TYPES if os.path.exists(f"/proc/self/ns/{_NS_FILE.get(t, t)}")
            ],
            "capabilities": sorted(caps.CAPS, key=caps.CAPS.__getitem__),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {
                "enabled": True,
                "actions": [
                    "SCMP_ACT_ALLOW",
                    "SCMP_ACT_ERRNO",
                    "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE",
                    "SCMP_ACT_TRAP",
                ],
                "operators": [
                    "SCMP_CMP_EQ",
                    "SCMP_CMP_GE",
                    "SCMP_CMP_GT",
                    "SCMP_CMP_LE",
                    "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ",
                    "SCMP_CMP_NE",
                ],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {"io.github.vzkit.runtime": "vz-runtime"},
    }
