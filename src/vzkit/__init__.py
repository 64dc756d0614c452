"""vzkit: virtual machines, micro-VMs and system containers on Linux hosts."""

from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
    StateError,
    VzError,
)

__version__ = "0.1.0"

__all__ = [
    "Conflict",
    "EngineError",
    "HostUnsupported",
    "InvalidConfig",
    "NotFound",
    "ResourceExhausted",
    "StateError",
    "VzError",
    "__version__",
]
