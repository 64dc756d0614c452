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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vzkit.sdk.aclient import AsyncClient
    from vzkit.sdk.client import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
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


def __getattr__(name: str) -> object:
    # The SDK on demand: `import vzkit` stays light (the CLI starts through it).
    if name == "Client":
        from vzkit.sdk.client import Client

        return Client
    if name == "AsyncClient":
        from vzkit.sdk.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'vzkit' has no attribute {name!r}")
