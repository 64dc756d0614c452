"""AsyncClient offers every Client call, with the same parameters, as a real coroutine."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.cli.vz_fake_daemon import IMAGE, INSTANCE, FakeVzd, Reply, exec_script
from vzkit.sdk.aclient import AsyncClient
from vzkit.sdk.client import Client
from vzkit.settings import Settings

# Calls whose answer streams: the async side yields asynchronously what the sync one yields.
STREAMING = {
    "events": ("Iterator[Event]", "AsyncIterator[Event]"),
    "pull_file": ("tuple[int, Iterator[bytes]]", "tuple[int, AsyncIterator[bytes]]"),
    "run": ("Iterator[EphemeralInstance]", "AsyncIterator[AsyncEphemeralInstance]"),
}


def public_calls(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_every_call_is_there_with_its_signature() -> None:
    sync, coro = public_calls(Client), public_calls(AsyncClient)
    assert sorted(sync) == sorted(coro)
    for name, sig in sync.items():
        other = coro[name]
        assert list(sig.parameters.values()) == list(other.parameters.values()), name
        expected = STREAMING.get(name, (sig.return_annotation, sig.return_annotation))
        assert (sig.return_annotation, other.return_annotation) == expected, name


def test_every_call_is_a_coroutine_or_an_async_iterator() -> None:
    for name, member in inspect.getmembers(AsyncClient, inspect.isfunction):
        if name.startswith("_") and name not in ("__aenter__", "__aexit__"):
            continue
        if name == "run":
            continue  # an async context manager, checked below
        assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVzd]:
    with FakeVzd(tmp_path / "vzd.sock").running() as f:
        yield f


def test_streams_and_blocks(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0/instances/web/files", Reply(200, b"x" * 200_000))
    fake.on("POST", "/1.0/instances", Reply(201, INSTANCE))
    fake.on("DELETE", "/1.0/instances/web", Reply(204))
    fake.on("GET", "/1.0/images", Reply(200, [IMAGE]))
    fake.ws_routes["/1.0/instances/web/exec"] = exec_script(b"hi")
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")

    async def main() -> tuple[int, bytes, bytes, list[str]]:
        async with AsyncClient(fake.path, settings=settings, autostart=False) as c:
            mode, chunks = await c.pull_file("web", "/f")
            data = b"".join([chunk async for chunk in chunks])
            async with c.run("minimal") as inst:
                _, out, _ = await inst.exec_capture(["echo", "hi"])
            images = [i.name for i in await c.list_images()]
            return mode, data, out, images

    mode, data, out, images = asyncio.run(main())
    assert (mode, data, out, images) == (0o644, b"x" * 200_000, b"hi", ["minimal"])
    assert fake.requests("DELETE") == [("DELETE", "/1.0/instances/web")]
