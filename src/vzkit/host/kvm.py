"""Is /dev/kvm worth using? Find out by running a few instructions of ring-0 code in it.

The existence of /dev/kvm is not enough: some hosts expose a KVM that emulates guest
kernel code one instruction at a time (``kvm_pvm``: guest ring 3 runs natively, ring 0 at a
few million instructions per second), under which a standard kernel cannot boot. So the
probe builds a tiny real-mode VM with raw ioctls, runs a counted loop at ring 0, and
measures the instruction rate. Hardware virtualisation runs it at hundreds of MIPS.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pydantic import Field

from vzkit.api.base import Strict

__all__ = [
    "MIN_RING0_MIPS",
    "KvmStatus",
    "Ring0Result",
    "classify",
    "measure_ring0",
    "probe_kvm",
    "vendor_modules",
]

# A standard kernel boots in ~1e9-1e10 ring-0 instructions; below this rate that takes
# minutes and, on kvm_pvm, ends in an emulation failure. Hardware runs the loop at >500.
MIN_RING0_MIPS = 100.0

# Bound on the wall time of one KVM_RUN; the interval timer interrupts a run that hangs.
_RUN_TIMEOUT_S = 0.5
# Grow the loop count until one run lasts this long, so the rate is not dominated by the
# cost of entering the guest. At ~3 MIPS the last run stays well under 0.3 s.
_TARGET_RUN_S = 0.02
_FIRST_COUNT = 20_000
_MAX_COUNT = 200_000_000
_GROWTH = 8

_KVM_API_VERSION = 12

# ioctl numbers from <linux/kvm.h> (x86-64).
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_SET_TSS_ADDR = 0xAE47
_KVM_RUN = 0xAE80
_KVM_GET_REGS = 0x8090AE81
_KVM_SET_REGS = 0x4090AE82
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_GET_TSC_KHZ = 0xAEA3

_EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
}
_EXIT_IO = 2
_EXIT_HLT = 5

_GUEST_MEM = 0x4000
_CODE_ADDR = 0x1000
_EXIT_PORT = 0x10
# Real mode, 16-bit code:  loop (addr32, so it counts ECX) back onto itself; then
# `mov al, 0x42; out 0x10, al` to leave the guest; `hlt` as a second way out.
_GUEST_CODE = bytes([0x67, 0xE2, 0xFD, 0xB0, 0x42, 0xE6, _EXIT_PORT, 0xF4])
# The loop instruction executes once per count; the exit sequence adds these.
_EXTRA_INSNS = 2

_VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm_hygon")


class KvmStatus(Strict):
    usable: bool
    module: str | None = Field(description="Vendor module(s) backing /dev/kvm, e.g. kvm_intel")
    reason: str = Field(description="Why KVM is (not) usable, in a sentence")
    ring0_mips: float | None = Field(
        None, description="Measured ring-0 instruction rate in millions per second"
    )
    tsc_khz: int | None = Field(None, description="The vCPU TSC frequency KVM reports")


@dataclass(frozen=True)
class Ring0Result:
    """What one measurement gave; ``error`` is set when the guest did not run cleanly."""

    mips: float | None
    error: str | None = None
    tsc_khz: int | None = None


# ---------------------------------------------------------------------------- structures


class _MemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class _Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *(f"r{i}" for i in range(8, 16)),
            *("rip", "rflags"),
        )
    ]


class _Segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class _DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("pad", ctypes.c_uint16 * 3)]


class _Sregs(ctypes.Structure):
    _fields_ = [
        ("cs", _Segment),
        ("ds", _Segment),
        ("es", _Segment),
        ("fs", _Segment),
        ("gs", _Segment),
        ("ss", _Segment),
        ("tr", _Segment),
        ("ldt", _Segment),
        ("gdt", _DTable),
        ("idt", _DTable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class _RunHeader(ctypes.Structure):
    """The start of struct kvm_run, up to the io / internal / fail_entry union."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        # union: io {direction u8, size u8, port u16, count u32, data_offset u64};
        # internal {suberror u32, ...}; fail_entry {hardware_entry_failure_reason u64, ...}
        ("u0", ctypes.c_uint64),
        ("u1", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_Regs) == 144 and ctypes.sizeof(_Sregs) == 312
assert ctypes.sizeof(_MemoryRegion) == 32


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _IoctlError(OSError):
    def __init__(self, name: str, err: int) -> None:
        super().__init__(err, f"{name}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        self.name = name


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure = 0, *, name: str) -> int:
    # ctypes instead of fcntl.ioctl: the argument may be an unsigned long (KVM_SET_TSS_ADDR
    # does not fit fcntl's C int), and an EINTR must come back to us unretried.
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else arg
    ret: int = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        raise _IoctlError(name, ctypes.get_errno())
    return ret


# ---------------------------------------------------------------------------- measurement


@contextmanager
def _run_timer(seconds: float) -> Iterator[None]:
    """Arm SIGALRM so a KVM_RUN that never exits returns EINTR (main thread only)."""

    def _on_alarm(signum: int, frame: FrameType | None) -> None:
        # Only the interruption matters: the ioctl sees EINTR and reports KVM_EXIT_INTR.
        pass

    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


def measure_ring0(device: str = "/dev/kvm") -> Ring0Result:
    """Run a counted ring-0 loop in a throw-away VM; return its instruction rate.

    Must run in the main thread (it uses an interval timer); see ``probe_kvm`` for the
    subprocess fallback used elsewhere. Raises OSError when /dev/kvm cannot be opened.
    """
    with ExitStack() as stack:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, kvm)
        try:
            return _measure(kvm, stack)
        except _IoctlError as exc:
            return Ring0Result(None, f"{exc.strerror}")


def _measure(kvm: int, stack: ExitStack) -> Ring0Result:
    api = _ioctl(kvm, _KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
    if api != _KVM_API_VERSION:
        return Ring0Result(None, f"KVM API version {api}, expected {_KVM_API_VERSION}")
    vm = _ioctl(kvm, _KVM_CREATE_VM, name="KVM_CREATE_VM")
    stack.callback(os.close, vm)
    with suppress(_IoctlError):
        # Needed by Intel hosts without unrestricted-guest support to run real mode.
        _ioctl(vm, _KVM_SET_TSS_ADDR, 0xFFFBD000, name="KVM_SET_TSS_ADDR")

    mem = mmap.mmap(-1, _GUEST_MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    stack.callback(mem.close)
    mem[_CODE_ADDR : _CODE_ADDR + len(_GUEST_CODE)] = _GUEST_CODE
    # The temporary c_char export dies at once, so mem.close() is not refused later.
    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = _MemoryRegion(0, 0, 0, _GUEST_MEM, host_addr)
    _ioctl(vm, _KVM_SET_USER_MEMORY_REGION, region, name="KVM_SET_USER_MEMORY_REGION")

    vcpu = _ioctl(vm, _KVM_CREATE_VCPU, 0, name="KVM_CREATE_VCPU")
    stack.callback(os.close, vcpu)
    run_size = _ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")
    run_map = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    stack.callback(run_map.close)

    tsc_khz: int | None
    try:
        tsc_khz = _ioctl(vcpu, _KVM_GET_TSC_KHZ, name="KVM_GET_TSC_KHZ") or None
    except _IoctlError:
        tsc_khz = None

    sregs = _Sregs()
    _ioctl(vcpu, _KVM_GET_SREGS, sregs, name="KVM_GET_SREGS")
    # Reset state is real mode at CS=F000 base FFFF0000; point CS at our code page.
    sregs.cs.base = 0
    sregs.cs.selector = 0
    _ioctl(vcpu, _KVM_SET_SREGS, sregs, name="KVM_SET_SREGS")

    def run(count: int) -> tuple[float, str | None]:
        regs = _Regs()
        regs.rip = _CODE_ADDR
        regs.rcx = count
        regs.rflags = 0x2
        _ioctl(vcpu, _KVM_SET_REGS, regs, name="KVM_SET_REGS")
        signal.setitimer(signal.ITIMER_REAL, _RUN_TIMEOUT_S)
        start = time.perf_counter()
        try:
            _ioctl(vcpu, _KVM_RUN, name="KVM_RUN")
        except _IoctlError as exc:
            if exc.errno == errno.EINTR:
                return 0.0, f"a {count}-iteration ring-0 loop did not end in {_RUN_TIMEOUT_S} s"
            return 0.0, f"KVM_RUN failed: {exc.strerror}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - start
        return elapsed, _check_exit(_RunHeader.from_buffer_copy(run_map, 0))

    with _run_timer(_RUN_TIMEOUT_S):
        # The first entry pays for building shadow/EPT tables; keep it out of the rate.
        _, error = run(1000)
        count = _FIRST_COUNT
        while error is None:
            elapsed, error = run(count)
            if error is None and (elapsed >= _TARGET_RUN_S or count >= _MAX_COUNT):
                mips = (count + _EXTRA_INSNS) / elapsed / 1e6
                return Ring0Result(mips, None, tsc_khz)
            count *= _GROWTH
    return Ring0Result(None, error, tsc_khz)


def _check_exit(run: _RunHeader) -> str | None:
    reason = run.exit_reason
    if reason == _EXIT_HLT:
        return None
    if reason == _EXIT_IO and (run.u0 >> 16) & 0xFFFF == _EXIT_PORT:
        return None
    name = _EXIT_NAMES.get(reason, str(reason))
    detail = ""
    if reason == 17:  # INTERNAL_ERROR: suberror 1 is "emulation failure"
        detail = f" (suberror {run.u0 & 0xFFFFFFFF})"
    elif reason == 9:  # FAIL_ENTRY
        detail = f" (hardware reason {run.u0:#x})"
    return f"the test guest stopped with KVM_EXIT_{name}{detail}"


def _measure_in_subprocess(device: str, timeout: float = 3.0) -> Ring0Result:
    """Run ``measure_ring0`` in a child Python: outside the main thread there is no
    SIGALRM handler to interrupt a hung KVM_RUN, but a child can simply be killed."""
    src_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vzkit.host.kvm", device],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Ring0Result(None, f"the KVM test did not finish in {timeout} s")
    try:
        data = json.loads(proc.stdout)
        return Ring0Result(data["mips"], data["error"], data["tsc_khz"])
    except (ValueError, KeyError, TypeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Ring0Result(None, f"the KVM test process failed: {tail}")


# ---------------------------------------------------------------------------- the probe


def vendor_modules(sys_module: Path = Path("/sys/module")) -> list[str]:
    """KVM vendor modules present (loaded, or built in with parameters)."""
    found = [m for m in _VENDOR_MODULES if (sys_module / m).is_dir()]
    try:
        others = sorted(
            p.name
            for p in sys_module.iterdir()
            if p.name.startswith("kvm_") and p.name not in _VENDOR_MODULES
        )
    except OSError:
        others = []
    return found + others


def classify(module: str | None, result: Ring0Result) -> KvmStatus:
    """Turn a ring-0 measurement into a verdict with a reason a user can act on."""
    label = f"KVM ({module})" if module else "KVM"
    if result.error is not None:
        return KvmStatus(
            usable=False,
            module=module,
            reason=f"{label} cannot run a test guest: {result.error}; using TCG",
            ring0_mips=result.mips,
            tsc_khz=result.tsc_khz,
        )
    mips = result.mips or 0.0
    if mips < MIN_RING0_MIPS:
        return KvmStatus(
            usable=False,
            module=module,
            reason=(
                f"{label} emulates guest ring-0 code at {mips:.1f} MIPS; "
                "a standard kernel cannot boot under it: using TCG"
            ),
            ring0_mips=round(mips, 2),
            tsc_khz=result.tsc_khz,
        )
    return KvmStatus(
        usable=True,
        module=module,
        reason=f"{label} runs guest ring-0 code at {mips:.0f} MIPS",
        ring0_mips=round(mips, 2),
        tsc_khz=result.tsc_khz,
    )


def probe_kvm(
    device: str = "/dev/kvm",
    *,
    sys_module: Path = Path("/sys/module"),
    measure: Callable[[str], Ring0Result] | None = None,
) -> KvmStatus:
    """Decide whether KVM is usable. ``measure`` replaces the ioctl test (for tests)."""
    modules = vendor_modules(sys_module)
    module = ",".join(modules) or None
    if not os.path.exists(device):
        hint = "load kvm_intel or kvm_amd" if module is None else "check the kvm module"
        return KvmStatus(
            usable=False, module=module, reason=f"{device} does not exist ({hint}); using TCG"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmStatus(
            usable=False,
            module=module,
            reason=f"no read/write access to {device} (join the 'kvm' group); using TCG",
        )
    if measure is None:
        in_main = threading.current_thread() is threading.main_thread()
        measure = measure_ring0 if in_main else _measure_in_subprocess
    try:
        result = measure(device)
    except OSError as exc:
        return KvmStatus(
            usable=False,
            module=module,
            reason=f"cannot open {device}: {exc.strerror}; using TCG",
        )
    return classify(module, result)


def _main(argv: list[str]) -> int:
    device = argv[1] if len(argv) > 1 else "/dev/kvm"
    try:
        r = measure_ring0(device)
    except OSError as exc:
        r = Ring0Result(None, f"cannot open {device}: {exc.strerror}")
    sys.stdout.write(json.dumps({"mips": r.mips, "error": r.error, "tsc_khz": r.tsc_khz}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
