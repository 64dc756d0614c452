"""Which devices the container may create (mknod) and open: ``linux.resources.devices``.

The rules are OCI's (``{"allow", "type": a|c|b, "major", "minor", "access": "rwm"}``),
taken in order over a start of "deny everything", followed by the default allow-list
below (runc appends its own the same way, so a config cannot take /dev/null away), then
mknod only of the nodes ``linux.devices`` asks the runtime to create. Unlike runc's list,
ours has no "mknod of any device" rule: a container with CAP_MKNOD can make the nodes it
was given and no others, and open none it was not given.

The list is reduced with cgroup v1's own semantics (:func:`effective`): a default (allow
or deny everything) and exceptions to it. A rule of the default's kind removes access from
the exception with the same type and numbers; one of the other kind adds to it; an ``a``
rule resets everything. The kernel then decides a request as v1 does: under a deny
default, one exception must grant every access asked for; under an allow default, no
exception may deny any of it.

- v1: ``a`` goes to devices.deny (or .allow), then each exception to the other file.
- v2: a BPF_PROG_TYPE_CGROUP_DEVICE program decides the same, loaded with bpf(2) and
  attached to the container's cgroup with BPF_F_ALLOW_MULTI (as runc and crun do). It
  reads the request from ``struct bpf_cgroup_dev_ctx`` {u32 access_type (access << 16 |
  device type), u32 major, u32 minor}, tests one block per exception (the first whose
  type, access and numbers match returns that exception's verdict) and else returns the
  default.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime.errors import EngineError, HostUnsupported, InvalidConfig

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any

    from vzkit_runtime.cgroups import Cgroup

    Json = dict[str, Any]
    #: (allow, type "a"|"c"|"b", major, minor, access bits); -1 numbers are wildcards.
    Rule = tuple[bool, str, int, int, int]

ANY = -1
# Access bits and device types as the kernel gives them to a device program.
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
ACC_ALL = 7
_ACCESS = {"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}
_BPF_TYPE = {"b": 1, "c": 2}

#: What every container may use whatever its config says: null, zero, full, random,
#: urandom, tty, console, ptmx and the pty slaves under /dev/pts.
DEFAULT_ALLOW: tuple[tuple[str, int, int], ...] = (
    ("c", 1, 3),
    ("c", 1, 5),
    ("c", 1, 7),
    ("c", 1, 8),
    ("c", 1, 9),
    ("c", 5, 0),
    ("c", 5, 1),
    ("c", 5, 2),
    ("c", 136, ANY),
)


def parse(entry: Json, where: str) -> Rule:
    """One OCI device rule, checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("allow"), bool):
        raise InvalidConfig(f"{where} needs a boolean 'allow'", hint='e.g. {"allow": false, '
                            '"access": "rwm"}')  # fmt: skip
    kind = entry.get("type") or "a"
    if kind not in ("a", "b", "c"):
        raise InvalidConfig(f"{where}: invalid device type {kind!r}", hint="use a, b or c")
    numbers = []
    for key in ("major", "minor"):
        value = entry.get(key)
        if value is None:
            value = ANY
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < 2**31:
            raise InvalidConfig(f"{where}: invalid {key} {value!r}")
        numbers.append(value)
    access = entry.get("access")
    if not isinstance(access, str) or not access or set(access) - set(_ACCESS):
        raise InvalidConfig(
            f"{where}: invalid access {access!r}", hint="a combination of r, w and m"
        )
    bits = 0
    for c in access:
        bits |= _ACCESS[c]
    return entry["allow"], kind, numbers[0], numbers[1], bits


def rules(spec: Json) -> list[Rule]:
    """The container's rules in order: its config's, the default allow-list, mknod of the
    nodes linux.devices creates."""
    linux = spec.get("linux") or {}
    given = (linux.get("resources") or {}).get("devices") or []
    if not isinstance(given, list):
        raise InvalidConfig("linux.resources.devices must be a list of rules")
    out = [parse(e, f"linux.resources.devices[{i}]") for i, e in enumerate(given)]
    out.extend((True, t, ma, mi, ACC_ALL) for t, ma, mi in DEFAULT_ALLOW)
    for dev in linux.get("devices") or []:
        if not isinstance(dev, dict) or dev.get("type") not in ("c", "u", "b"):
            continue  # fifos are no devices; mounts.create_device reports bad entries
        major, minor = dev.get("major"), dev.get("minor")
        if isinstance(major, int) and isinstance(minor, int):
            kind = "b" if dev["type"] == "b" else "c"
            out.append((True, kind, major, minor, ACC_MKNOD))
    return out


def effective(rule_list: list[Rule]) -> tuple[bool, list[Rule]]:
    """(default allow?, exceptions) after applying ``rule_list`` as cgroup v1 would,
    starting from "deny everything". Every exception has the opposite verdict."""
    default = False
    exceptions: list[list[Any]] = []
    for allow, kind, major, minor, access in rule_list:
        if kind == "a":
            default, exceptions = allow, []
            continue
        same = next((e for e in exceptions if e[1:4] == [kind, major, minor]), None)
        if allow == default:
            if same is not None:
                same[4] &= ~access
                if not same[4]:
                    exceptions.remove(same)
        elif same is not None:
            same[4] |= access
        else:
            exceptions.append([allow, kind, major, minor, access])
    return default, [(e[0], e[1], e[2], e[3], e[4]) for e in exceptions]


# ---------------------------------------------------------------------------- v1


def v1_lines(default: bool, exceptions: list[Rule]) -> list[tuple[str, str]]:
    """(file, line) writes that set a fresh v1 devices cgroup to this rule set."""
    out = [("devices.allow" if default else "devices.deny", "a")]
    for allow, kind, major, minor, access in exceptions:
        nums = ":".join("*" if n == ANY else str(n) for n in (major, minor))
        acc = "".join(c for c in "rwm" if access & _ACCESS[c])
        out.append(("devices.allow" if allow else "devices.deny", f"{kind} {nums} {acc}"))
    return out


def apply(group: Cgroup, rule_list: list[Rule]) -> None:
    """Set the rules on the container's new cgroup (before any process joins it)."""
    from vzkit_runtime.cgroups import write

    default, exceptions = effective(rule_list)
    if default and not exceptions:
        return  # everything allowed: what a new cgroup under an open parent has already
    d = group.dir("devices")
    if d is None:
        raise HostUnsupported(
            "cannot restrict devices: the cgroup v1 'devices' controller is not mounted",
            hint="mount it (mount -t cgroup -o devices cgroup /sys/fs/cgroup/devices)",
        )
    if group.version == 1:
        for name, line in v1_lines(default, exceptions):
            write(f"{d}/{name}", line, "linux.resources.devices")
        return
    attach(d, program(default, exceptions))


# ---------------------------------------------------------------------------- v2: BPF

# eBPF opcodes (<linux/bpf_common.h>, <linux/bpf.h>): class | operation | source.
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_AND32_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RSH32_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_MOV32_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K
_MOV32_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X
_EXIT = 0x95  # BPF_JMP | BPF_EXIT
_NEXT = object()  # a jump's target until the block's length is known

_PROLOGUE = (
    (_LDX_W, 2, 1, 0, 0),  # r2 = ctx->access_type
    (_AND32_K, 2, 0, 0, 0xFFFF),  # r2 &= 0xffff: the device type
    (_LDX_W, 3, 1, 0, 0),  # r3 = ctx->access_type
    (_RSH32_K, 3, 0, 0, 16),  # r3 >>= 16: the access asked for
    (_LDX_W, 4, 1, 4, 0),  # r4 = ctx->major
    (_LDX_W, 5, 1, 8, 0),  # r5 = ctx->minor
)


def _insn(op: int, dst: int, src: int, off: int, imm: int) -> bytes:
    """struct bpf_insn {u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm} (little end)."""
    return (
        bytes((op, (src << 4) | dst))
        + off.to_bytes(2, "little", signed=True)
        + imm.to_bytes(4, "little", signed=True)
    )


def _block(rule: Rule) -> list[tuple[int, int, int, Any, int]]:
    allow, kind, major, minor, access = rule
    out: list[tuple[int, int, int, Any, int]] = [(_JNE_K, 2, 0, _NEXT, _BPF_TYPE[kind])]
    if allow and access != ACC_ALL:
        # Every access asked for must be granted: (r3 & access) == r3.
        out += [(_MOV32_X, 1, 3, 0, 0), (_AND32_K, 1, 0, 0, access), (_JNE_X, 1, 3, _NEXT, 0)]
    elif not allow and access != ACC_ALL:
        # Any access asked for that is denied: (r3 & access) != 0.
        out += [(_MOV32_X, 1, 3, 0, 0), (_AND32_K, 1, 0, 0, access), (_JEQ_K, 1, 0, _NEXT, 0)]
    if major != ANY:
        out.append((_JNE_K, 4, 0, _NEXT, major))
    if minor != ANY:
        out.append((_JNE_K, 5, 0, _NEXT, minor))
    out += [(_MOV32_K, 0, 0, 0, int(allow)), (_EXIT, 0, 0, 0, 0)]
    return out


def program(default: bool, exceptions: list[Rule]) -> bytes:
    """The device program for this rule set, as the bytes bpf(BPF_PROG_LOAD) takes."""
    code = b"".join(_insn(*i) for i in _PROLOGUE)
    for rule in exceptions:
        block = _block(rule)
        for i, (op, dst, src, off, imm) in enumerate(block):
            code += _insn(op, dst, src, len(block) - i - 1 if off is _NEXT else off, imm)
    return code + _insn(_MOV32_K, 0, 0, 0, int(default)) + _insn(_EXIT, 0, 0, 0, 0)


def attach(cgroup_dir: str, code: bytes) -> None:
    """Load ``code`` as a cgroup device program and attach it to ``cgroup_dir``."""
    from vzkit_runtime import syscalls as sc

    prog = sc.bpf_prog_load(sc.BPF_PROG_TYPE_CGROUP_DEVICE, code, "device rules")
    try:
        target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sc.bpf_prog_attach(target, prog, sc.BPF_CGROUP_DEVICE, sc.BPF_F_ALLOW_MULTI)
        finally:
            os.close(target)
    except OSError as exc:
        raise EngineError(f"open cgroup {cgroup_dir}: {exc.strerror}") from None
    finally:
        # The attachment holds the program; it goes with the cgroup.
        os.close(prog)
