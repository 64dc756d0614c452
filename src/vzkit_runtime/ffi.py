"""The part of ctypes syscalls.py needs, on the ``_ctypes`` C module directly.

``import ctypes`` executes about 16 million instructions (its package defines dozens of
types and imports struct and os for them): some 4 ms of every ``vz-runtime`` call, an
eighth of a container's whole creation. This module defines the handful of C types and
the libc function objects the runtime calls, on the same C machinery, for a tenth of that.
The classes behave as ctypes' own (they are built the same way); seccomp.py, off the hot
path, still uses ctypes itself for libseccomp.
"""

from __future__ import annotations

import _ctypes as _ctypes_module

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any

# Typed loosely: these are ctypes' own building blocks, which its stubs describe in
# terms of the classes ctypes defines on them.
_ctypes: Any = _ctypes_module


class c_int(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "i"


class c_uint(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "I"


class c_long(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "l"


class c_ulong(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "L"


class c_char_p(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "z"


class c_char(_ctypes._SimpleCData):  # type: ignore[misc]
    _type_ = "c"


c_size_t = c_ulong  # LP64, the only data model the runtime runs on (x86_64, aarch64)


def addressof(obj: Any) -> int:
    address: int = _ctypes.addressof(obj)
    return address


def get_errno() -> int:
    err: int = _ctypes.get_errno()
    return err


def buffer(init: bytes | int) -> Any:
    """A mutable C char array: ``init`` bytes copied in, or that many zero bytes."""
    size = init if isinstance(init, int) else len(init)
    char: Any = c_char
    buf = (char * size)()
    if not isinstance(init, int):
        buf.raw = init
    return buf


class _Function(_ctypes.CFuncPtr):  # type: ignore[misc]
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = c_int


class Library:
    """A shared library (``dlopen``); functions are made on demand by :meth:`function`."""

    def __init__(self, name: str) -> None:
        self._handle = _ctypes.dlopen(name, _RTLD_NOW)

    def function(
        self, name: str, argtypes: tuple[Any, ...] | None = None, restype: Any = c_int
    ) -> Any:
        """The C function ``name``; errno is captured for get_errno()."""
        fn = _Function((name, self))
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = restype
        return fn


_RTLD_NOW = 2
