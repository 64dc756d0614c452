"""What the SDK's modules share: the API prefix and turning answers into models."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from vzkit.errors import VzError

API = "/1.0"


# Which vzkit.api module holds a model, where it is not vzkit.api.instances.
_HOME = {
    "Event": "events",
    "NetworkConfig": "networks",
    "Operation": "operations",
    "PoolInfo": "storage",
    "SnapshotInfo": "snapshots",
    "VolumeInfo": "storage",
}


def _parse(model: str, data: Any) -> Any:
    """Validate an answer into the named model from vzkit.api."""
    import importlib

    from pydantic import ValidationError

    module = importlib.import_module(f"vzkit.api.{_HOME.get(model, 'instances')}")
    try:
        return getattr(module, model).model_validate(data)
    except ValidationError as exc:
        raise VzError(
            f"vzd sent a {model} this client does not understand: {exc.errors()[0]['msg']}",
            hint="vz and vzd may be different versions: compare with: vz daemon status",
        ) from exc


def _q(name: str) -> str:
    return quote(name, safe="")
