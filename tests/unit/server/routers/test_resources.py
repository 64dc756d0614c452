"""The other routers through the real app: each answers from its own service."""

from __future__ import annotations

import pytest

from ..asgi import AsgiClient
from ..conftest import Daemon

pytestmark = pytest.mark.anyio

API = "/1.0"


async def test_server_info_knows_the_unix_caller(api: AsgiClient) -> None:
    r = await api.get(API)
    assert r.status == 200
    body = r.json()
    assert body["auth"] == "trusted" and body["caller"] == "unix:uid=0"


async def test_volumes_and_their_attachments(api: AsgiClient) -> None:
    r = await api.post(f"{API}/volumes", {"name": "data", "size": 1 << 20})
    assert r.status == 201 and r.json()["attached_to"] == []
    await api.post(f"{API}/instances", {"name": "web", "type": "vm", "nics": []})
    r = await api.post(f"{API}/instances/web/volumes", {"volume": "data"})
    assert r.status == 200 and [v["volume"] for v in r.json()["volumes"]] == ["data"]
    r = await api.get(f"{API}/storage/default/volumes/data")
    assert r.json()["attached_to"] == ["web"]
    r = await api.delete(f"{API}/storage/default/volumes/data")
    assert r.status == 409 and "vz volume detach web data" in r.json()["hint"]
    r = await api.delete(f"{API}/instances/web/volumes/default/data")
    assert r.status == 200 and r.json()["volumes"] == []


async def test_networks_and_nics(api: AsgiClient, daemon: Daemon) -> None:
    daemon.nets.add("lan")
    assert [n["name"] for n in (await api.get(f"{API}/networks")).json()] == ["lan"]
    await api.post(f"{API}/instances", {"name": "web", "type": "vm", "nics": []})
    r = await api.post(f"{API}/instances/web/nics", {"network": "lan"})
    assert r.status == 200 and r.json()["nics"][0]["ip"].startswith("10.99.0.")
    r = await api.delete(f"{API}/instances/web/nics/other")
    assert r.status == 404 and r.json()["hint"] == "see its interfaces: vz info web"
    r = await api.put(f"{API}/instances/web/firewall", {"rules": []})
    assert r.status == 200 and r.json()["firewall"] == []


async def test_images_operations_stats_and_metrics(api: AsgiClient) -> None:
    await api.post(f"{API}/instances", {"name": "web", "type": "vm", "nics": []})
    assert [i["name"] for i in (await api.get(f"{API}/images")).json()] == ["minimal"]
    r = await api.delete(f"{API}/images/minimal")
    assert r.status == 409 and r.json()["code"] == "conflict"
    assert (await api.get(f"{API}/operations")).json() == []
    r = await api.get(f"{API}/operations/nope")
    assert r.status == 404
    stats = (await api.get(f"{API}/stats")).json()
    assert [(s["name"], s["state"]) for s in stats] == [("web", "running")]
    text = (await api.get("/metrics")).body.decode()
    assert 'vz_instance_state{instance="web",type="vm",state="running"} 1' in text
    assert 'vz_api_requests_total{method="GET",route="/1.0/stats",status="200"} 1' in text


async def test_mutations_are_audited(api: AsgiClient, daemon: Daemon) -> None:
    await api.post(f"{API}/instances", {"name": "web", "type": "vm", "nics": []})
    await api.delete(f"{API}/instances/nope")
    lines = (daemon.settings.state_dir / "audit.log").read_text().splitlines()
    assert ['"path": "/1.0/instances"' in lines[0], '"status": 404' in lines[1]] == [True, True]
    assert all('"caller": "unix:uid=0"' in line for line in lines)
