"""``vz launch --privileged`` and ``vz config set limits.processes`` against a fake vzd
(the accepted update is tested against a real vzd: tests/integration/test_container_security)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.cli.test_cli import vz
from tests.unit.cli.vz_fake_daemon import IMAGE, INSTANCE, FakeVzd, Reply

PRIVILEGED = {
    **INSTANCE,
    "type": "container",
    "security": {"privileged": True},
    "warnings": ["privileged container: its root is host root"],
}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVzd]:
    with FakeVzd(tmp_path / "vzd.sock").running() as f:
        yield f


def test_launch_privileged_asks_for_it_and_shows_the_warning(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    fake.on("POST", "/1.0/instances", Reply(201, PRIVILEGED))
    r = vz(tmp_path, "launch", "minimal", "web", "--type", "container", "--privileged")
    assert r.returncode == 0, r.stderr
    body = json.loads(next(s.body for s in fake.seen if s.method == "POST"))
    assert body["security"] == {"privileged": True}
    assert b"warning: privileged container" in r.stderr


def test_launch_without_the_flag_sends_no_security(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    fake.on("POST", "/1.0/instances", Reply(201, INSTANCE))
    r = vz(tmp_path, "launch", "minimal", "web", "--type", "container")
    assert r.returncode == 0 and b"warning" not in r.stderr
    body = json.loads(next(s.body for s in fake.seen if s.method == "POST"))
    assert "security" not in body


def test_config_set_processes_is_checked_locally(fake: FakeVzd, tmp_path: Path) -> None:
    for value in ("3", "5000000", "many"):
        r = vz(tmp_path, "config", "set", "web", f"limits.processes={value}")
        assert r.returncode == 2 and b"limits.processes" in r.stderr and b"hint:" in r.stderr
    assert fake.seen == []
