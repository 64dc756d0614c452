"""The security and process-limit fields of the instance models."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from vzkit.api.bounds import DEFAULT_PROCESSES, PROCESSES
from vzkit.api.instances import Instance, InstanceCreate, Limits, LimitsUpdate

RECORD: dict[str, Any] = {
    "name": "c1",
    "type": "container",
    "image": "minimal",
    "limits": {"cpus": 1, "memory": 64 * 2**20},
    "state": "stopped",
    "created_at": "2024-01-01T00:00:00Z",
}


def test_new_containers_are_unprivileged_by_default() -> None:
    req = InstanceCreate.model_validate({"type": "container"})
    assert req.security.privileged is False
    assert InstanceCreate.model_validate(
        {"type": "container", "security": {"privileged": True}}
    ).security.privileged


def test_privileged_is_a_strict_boolean() -> None:
    for bad in ("true", 1, "yes"):
        with pytest.raises(ValidationError):
            InstanceCreate.model_validate({"security": {"privileged": bad}})
    with pytest.raises(ValidationError):
        InstanceCreate.model_validate({"security": {"isolated": True}})


def test_container_records_from_before_user_namespaces_are_privileged() -> None:
    old = Instance.model_validate(RECORD)
    assert old.security.privileged and old.warnings and "host root" in old.warnings[0]
    new = Instance.model_validate({**RECORD, "security": {"privileged": False}})
    assert not new.security.privileged and new.warnings == []
    vm = Instance.model_validate({**RECORD, "type": "microvm"})
    assert not vm.security.privileged and vm.warnings == []


def test_warnings_are_derived_not_taken_from_the_input() -> None:
    inst = Instance.model_validate(
        {**RECORD, "security": {"privileged": False}, "warnings": ["made up"]}
    )
    assert inst.warnings == []
    again = Instance.model_validate_json(Instance.model_validate(RECORD).model_dump_json())
    assert again.security.privileged and len(again.warnings) == 1


def test_processes_limit_default_and_bounds() -> None:
    assert Limits().processes == DEFAULT_PROCESSES == 2048
    assert Limits.model_validate({"processes": PROCESSES[0]}).processes == PROCESSES[0]
    for bad in (PROCESSES[0] - 1, PROCESSES[1] + 1, "64", 64.0, True):
        with pytest.raises(ValidationError):
            Limits.model_validate({"processes": bad})
    assert LimitsUpdate.model_validate({"processes": 100}).processes == 100
    assert LimitsUpdate().processes is None
