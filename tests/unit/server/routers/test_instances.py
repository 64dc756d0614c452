"""Instance routes through the real app: bodies, status codes, error bodies, background."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from vzkit.api.instances import Instance
from vzkit.api.operations import Operation

from ..asgi import AsgiClient
from ..conftest import Daemon

pytestmark = pytest.mark.anyio

API = "/1.0"
INSTANCES = TypeAdapter(list[Instance])


def _create(name: str, **kw: object) -> dict[str, object]:
    return {"name": name, "type": "vm", "nics": [], **kw}


async def test_the_list_follows_every_change(api: AsgiClient, daemon: Daemon) -> None:
    assert (await api.get(f"{API}/instances")).json() == []
    r = await api.post(f"{API}/instances", _create("web"))
    assert r.status == 201 and Instance.model_validate(r.json()).state == "running"
    await api.post(f"{API}/instances", _create("db", start=False))
    listed = await api.get(f"{API}/instances")
    assert listed.status == 200 and listed.headers["content-type"] == "application/json"
    assert INSTANCES.validate_json(listed.body) == daemon.services.instances.list()
    await api.put(f"{API}/instances/web/state", {"action": "stop"})
    states = {
        i.name: i.state.value
        for i in INSTANCES.validate_json((await api.get(f"{API}/instances")).body)
    }
    assert states == {"db": "stopped", "web": "stopped"}
    await api.delete(f"{API}/instances/db")
    assert [i["name"] for i in (await api.get(f"{API}/instances")).json()] == ["web"]


async def test_errors_are_error_bodies(api: AsgiClient) -> None:
    r = await api.get(f"{API}/instances/nope")
    assert r.status == 404
    assert r.json() == {
        "error": "instance 'nope' not found",
        "code": "not_found",
        "hint": "list instances: vz list",
    }
    await api.post(f"{API}/instances", _create("web"))
    r = await api.request("DELETE", f"{API}/instances/web")
    assert r.status == 409 and r.json()["code"] == "invalid_state"
    assert r.json()["details"] == {"state": "running"}
    r = await api.post(f"{API}/instances", {"name": "x", "type": "tank"})
    assert r.status == 422 and r.json()["code"] == "invalid_config"
    assert r.json()["error"].startswith("invalid request: type:")
    r = await api.get(f"{API}/no/such/route")
    assert r.status == 404 and r.json()["code"] == "not_found"


async def test_background_work_answers_202_with_its_operation(api: AsgiClient) -> None:
    r = await api.post(f"{API}/instances", _create("web"), background="true")
    assert r.status == 202
    op = Operation.model_validate(r.json())
    assert r.headers["location"] == f"{API}/operations/{op.id}"
    done = await api.get(f"{API}/operations/{op.id}/wait", timeout=30)
    assert done.status == 200 and done.json()["status"] == "success"
    r = await api.put(f"{API}/instances/nope/state", {"action": "stop"}, background="true")
    assert r.status == 404  # an unknown instance is refused at once, not as a failed operation


async def test_state_changes_and_snapshots(api: AsgiClient) -> None:
    await api.post(f"{API}/instances", _create("web"))
    r = await api.put(f"{API}/instances/web/state", {"action": "pause"})
    assert r.status == 200 and r.json()["state"] == "paused"
    r = await api.post(f"{API}/instances/web/snapshots", {"name": "s1", "stateful": True})
    assert r.status == 201 and r.json()["stateful"] is True
    r = await api.get(f"{API}/instances/web/snapshots")
    assert [s["name"] for s in r.json()] == ["s1"]
    r = await api.post(f"{API}/instances/web/copy", {"name": "web2"})
    assert r.status == 201 and r.json()["state"] == "stopped"
    r = await api.post(f"{API}/instances/web/snapshots/s1/restore")
    assert r.status == 200 and r.json()["state"] == "running"
    r = await api.delete(f"{API}/instances/web/snapshots/s1")
    assert r.status == 204 and r.body == b""
