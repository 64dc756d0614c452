"""Capability tables and set computation (pure parts of caps.py)."""

from __future__ import annotations

import pytest

from vzkit_runtime import caps
from vzkit_runtime.errors import InvalidConfig


def test_table_matches_kernel_numbers() -> None:
    assert caps.CAPS["CAP_CHOWN"] == 0
    assert caps.CAPS["CAP_NET_ADMIN"] == 12
    assert caps.CAPS["CAP_SYS_ADMIN"] == 21
    assert caps.CAPS["CAP_AUDIT_READ"] == 37
    assert caps.CAPS["CAP_CHECKPOINT_RESTORE"] == 40
    assert sorted(caps.CAPS.values()) == list(range(41))


def test_last_cap_reads_kernel() -> None:
    assert caps.last_cap() >= 36


def test_names_are_normalised() -> None:
    assert caps.cap_number("CAP_KILL") == 5
    assert caps.cap_number("kill") == 5
    assert caps.cap_number("cap_kill") == 5


def test_unknown_name_is_invalid_config() -> None:
    with pytest.raises(InvalidConfig, match="CAP_FLY"):
        caps.plan_capabilities({"bounding": ["CAP_FLY"]}, 40)


def test_plan_masks_and_bounding_drops() -> None:
    plan = caps.plan_capabilities(
        {
            "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL", "CAP_CHOWN"],
            "ambient": ["CAP_KILL"],
        },
        40,
    )
    assert plan.bounding == (1 << 0) | (1 << 5) | (1 << 10)
    assert plan.effective == 1 << 5
    assert plan.permitted == (1 << 5) | 1
    assert plan.inheritable == 0
    assert plan.ambient == 1 << 5
    drops = plan.drop_from_bounding(40)
    assert 0 not in drops and 5 not in drops and 10 not in drops
    assert len(drops) == 41 - 3
    assert plan.warnings == []


def test_caps_newer_than_kernel_are_skipped_with_warning() -> None:
    plan = caps.plan_capabilities(
        {"bounding": ["CAP_CHOWN", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]}, 38
    )
    assert plan.bounding == 1
    assert len(plan.warnings) == 2
    assert "CAP_BPF" in plan.warnings[0]
    assert max(plan.drop_from_bounding(38)) == 38


def test_non_list_is_invalid() -> None:
    with pytest.raises(InvalidConfig, match="effective"):
        caps.plan_capabilities({"effective": "CAP_KILL"}, 40)


def test_none_is_a_no_op() -> None:
    assert caps.apply_capabilities(None) == []
