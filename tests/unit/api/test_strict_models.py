"""The request models take JSON's types as they are (issue 11: the API accepted what the CLI
refused): no bool as a number, no string as a number, sizes within the bounds of
vzkit.api.bounds, and the documented string forms ("512MiB") still."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from vzkit.api.bounds import MIN_MEMORY, MiB, PiB
from vzkit.api.instances import (
    ExecRequest,
    Instance,
    InstanceCreate,
    InstanceUpdate,
    Limits,
    StateChange,
)
from vzkit.api.networks import FirewallRule, NetworkConfig, NetworkUpdate, PortForward
from vzkit.api.remote import TrustCreate
from vzkit.api.snapshots import SnapshotCreate
from vzkit.api.storage import VolumeAttachment, VolumeConfig, VolumeUpdate


def both_ways(model: type[BaseModel], body: dict[str, Any]) -> None:
    """Refused from a Python dict (the SDK) and from JSON text (the API) alike."""
    with pytest.raises(ValidationError):
        model.model_validate(body)
    with pytest.raises(ValidationError):
        model.model_validate_json(json.dumps(body))


@pytest.mark.parametrize(
    "limits",
    [
        {"memory": 1},  # 1 MiB: reached the engine and answered 500
        {"memory": True},  # made a 1 MiB container
        {"memory": 1.5},
        {"memory": "2PiB"},
        {"memory": 2 * PiB},
        {"cpus": "2"},  # was coerced to 2
        {"cpus": True},
        {"cpus": 2.0},
        {"cpu_weight": "100"},
        {"cpu_pin": ["0"]},
        {"cpu_pin": [True]},
    ],
)
def test_create_limits_refused(limits: dict[str, Any]) -> None:
    both_ways(InstanceCreate, {"limits": limits})


@pytest.mark.parametrize(
    "body",
    [
        {"start": "yes"},
        {"start": 1},
        {"ephemeral": "true"},
        {"ephemeral": 0},
    ],
)
def test_create_flags_refused(body: dict[str, Any]) -> None:
    both_ways(InstanceCreate, body)


@pytest.mark.parametrize("type", sorted(MIN_MEMORY))
def test_memory_floor_follows_the_type(type: str) -> None:
    least = MIN_MEMORY[type]
    create = InstanceCreate.model_validate({"type": type, "limits": {"memory": least}})
    assert create.limits.memory == least
    with pytest.raises(ValidationError, match=f"too small for a {type}"):
        InstanceCreate.model_validate({"type": type, "limits": {"memory": least - MiB}})


def test_documented_forms_still_accepted() -> None:
    create = InstanceCreate.model_validate_json(
        '{"limits": {"memory": "512MiB", "cpus": 2, "cpu_weight": 300, "cpu_pin": [0]},'
        ' "start": false, "ephemeral": true}'
    )
    assert create.limits.memory == 512 * MiB and create.limits.cpus == 2
    assert InstanceCreate.model_validate({"limits": {"memory": 512}}).limits.memory == 512 * MiB
    assert InstanceCreate.model_validate({"limits": {"memory": "1PiB"}}).limits.memory == PiB
    update = InstanceUpdate.model_validate_json('{"limits": {"memory": "1GiB"}}')
    assert update.limits.memory == 1024 * MiB


@pytest.mark.parametrize(
    "limits", [{"memory": 1}, {"memory": True}, {"cpus": "2"}, {"cpu_weight": True}]
)
def test_update_limits_refused(limits: dict[str, Any]) -> None:
    both_ways(InstanceUpdate, {"limits": limits})


def test_stored_instances_still_load() -> None:
    # The floors are for requests: an instance stored before a floor was raised still loads.
    small = Limits.model_validate({"memory": 4 * MiB})
    inst = Instance(
        name="old",
        type="container",
        image="minimal",
        limits=small,
        state="stopped",
        created_at=datetime.now(UTC),
    )
    assert Instance.model_validate_json(inst.model_dump_json()).limits.memory == 4 * MiB


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (StateChange, {"action": "stop", "force": 1}),
        (StateChange, {"action": "stop", "timeout": "30"}),
        (StateChange, {"action": "stop", "timeout": 3601}),
        (ExecRequest, {"argv": ["true"], "rows": "24"}),
        (ExecRequest, {"argv": ["true"], "tty": "false"}),
        (ExecRequest, {"argv": ["true"], "timeout": True}),
        (PortForward, {"host_port": "8080", "port": 80}),
        (PortForward, {"host_port": 8080, "port": True}),
        (FirewallRule, {"proto": "tcp", "port": "22"}),
        (NetworkConfig, {"name": "lab", "isolated": "true"}),
        (NetworkUpdate, {"isolated": 1}),
        (SnapshotCreate, {"stateful": "yes"}),
        (VolumeConfig, {"name": "v", "size": True}),
        (VolumeConfig, {"name": "v", "size": 1.5e9}),
        (VolumeConfig, {"name": "v", "size": "2PiB"}),
        (VolumeUpdate, {"size": [1]}),
        (VolumeAttachment, {"volume": "v", "readonly": "yes"}),
        (TrustCreate, {"name": "ci", "expires_in": "3600"}),
    ],
)
def test_other_request_fields_refused(model: type[BaseModel], body: dict[str, Any]) -> None:
    both_ways(model, body)


def test_other_documented_forms_still_accepted() -> None:
    assert StateChange.model_validate({"action": "stop", "timeout": 5}).timeout == 5.0
    assert VolumeConfig.model_validate({"name": "v", "size": "1PiB"}).size == PiB
    assert PortForward.model_validate_json('{"host_port": 8080, "port": 80}').port == 80
