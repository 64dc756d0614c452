"""Linux capabilities for the container process: bounding, effective, permitted,
inheritable and ambient sets from an OCI ``process.capabilities`` object.

Order with a uid change (what the container init must do)::

    keep_caps_across_setuid()          # PR_SET_KEEPCAPS=1: permitted survives setuid
    os.setgroups(...); os.setgid(...); os.setuid(...)
    apply_capabilities(caps)           # restores effective, drops bounding, sets the rest

``apply_capabilities`` first raises effective to the current permitted set, because
setuid clears effective even with KEEPCAPS and dropping from the bounding set needs
CAP_SETPCAP in effective; so it also works when called before any uid change. Without
KEEPCAPS a setuid to non-zero clears permitted and nothing can be restored.

Imports stdlib + ctypes only (through ``syscalls``): this runs in ``vz-runtime``.
"""

from __future__ import annotations

from vzkit_runtime import syscalls as sc
from vzkit_runtime.errors import InvalidConfig

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2 ms to import: mypy only
    from typing import Any

_NAMES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)

#: Capability name (``CAP_*``) -> number, CAP_CHOWN (0) .. CAP_CHECKPOINT_RESTORE (40).
CAPS: dict[str, int] = {f"CAP_{name}": i for i, name in enumerate(_NAMES)}

#: The OCI capability sets, in the order they are applied.
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")

_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability number the running kernel knows (cached)."""
    global _last_cap
    if _last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
                _last_cap = int(f.read())
        except OSError:
            # Without /proc (early init, odd sandboxes) assume the table we know.
            _last_cap = max(CAPS.values())
    return _last_cap


def cap_number(name: str) -> int:
    """The number of capability ``name`` (``CAP_NET_ADMIN``; case and prefix optional)."""
    key = name.strip().upper()
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    try:
        return CAPS[key]
    except KeyError:
        raise InvalidConfig(
            f"unknown capability {name!r} in process.capabilities",
            "use names like CAP_NET_BIND_SERVICE; see capabilities(7)",
        ) from None


class CapPlan:
    """What to apply: one 64-bit mask per set, plus warnings about skipped names."""

    # A plain class: dataclasses imports inspect, which costs milliseconds at start-up.
    __slots__ = ("ambient", "bounding", "effective", "inheritable", "permitted", "warnings")

    def __init__(self) -> None:
        self.bounding = 0
        self.effective = 0
        self.permitted = 0
        self.inheritable = 0
        self.ambient = 0
        self.warnings: list[str] = []

    def drop_from_bounding(self, kernel_last: int) -> list[int]:
        """Capabilities the kernel knows that are not in the bounding set."""
        return [c for c in range(kernel_last + 1) if not self.bounding & (1 << c)]


def plan_capabilities(caps: dict[str, Any], kernel_last: int) -> CapPlan:
    """Turn an OCI capabilities object into masks, validating every name.

    Unknown names raise :class:`InvalidConfig`; names the running kernel does not know
    (number above ``kernel_last``) are skipped with a warning, as runc does.
    """
    plan = CapPlan()
    for set_name in CAP_SETS:
        names = caps.get(set_name) or []
        if not isinstance(names, list):
            raise InvalidConfig(
                f"process.capabilities.{set_name} must be a list of names",
                'write it as ["CAP_CHOWN", ...]',
            )
        mask = 0
        for name in names:
            num = cap_number(str(name))
            if num > kernel_last:
                plan.warnings.append(
                    f"capability {name} ({set_name}) is unknown to the running kernel; skipped"
                )
                continue
            mask |= 1 << num
        setattr(plan, set_name, mask)
    return plan


def keep_caps_across_setuid() -> None:
    """PR_SET_KEEPCAPS=1: keep the permitted set when the uid changes from 0."""
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)


def clear_keep_caps() -> None:
    """PR_SET_KEEPCAPS=0 (the flag is also cleared by execve)."""
    sc.prctl(sc.PR_SET_KEEPCAPS, 0)


def apply_capabilities(caps: dict[str, Any] | None) -> list[str]:
    """Apply an OCI ``process.capabilities`` object to the calling thread.

    ``None`` leaves the capabilities untouched (runc does the same). Returns warnings
    (capabilities skipped because the kernel lacks them, ambient raises refused).
    Raises :class:`InvalidConfig` for unknown names, :class:`SyscallError` on failure.
    """
    if caps is None:
        return []
    kernel_last = last_cap()
    plan = plan_capabilities(caps, kernel_last)

    # setuid() clears effective even with KEEPCAPS; PR_CAPBSET_DROP needs CAP_SETPCAP in it.
    _eff, prm, inh = sc.capget()
    sc.capset(prm, prm, inh)

    for cap in plan.drop_from_bounding(kernel_last):
        sc.prctl(sc.PR_CAPBSET_DROP, cap)

    sc.capset(plan.effective, plan.permitted, plan.inheritable)

    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(kernel_last + 1):
        if plan.ambient & (1 << cap):
            try:
                sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
            except sc.SyscallError as exc:
                # The kernel requires ambient caps to be permitted and inheritable;
                # runc only warns here, and so do we.
                plan.warnings.append(f"cannot raise ambient capability {cap}: {exc.message}")
    return plan.warnings
