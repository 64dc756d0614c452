"""SDK tests against a fake vzd on a temporary unix socket."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import ServerConnection

from tests.integration.helpers import wait_for
from tests.unit.cli.vz_fake_daemon import (
    IMAGE,
    INSTANCE,
    SERVER_INFO,
    FakeVzd,
    Reply,
    Seen,
    error,
    exec_script,
)
from vzkit.api.instances import ExecResult, ImageInfo, Instance, InstanceCreate
from vzkit.errors import (
    Conflict,
    DaemonUnavailable,
    ImageError,
    InvalidConfig,
    NotFound,
    StateError,
    VzError,
)
from vzkit.sdk.client import Client
from vzkit.settings import Settings


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVzd]:
    with FakeVzd(tmp_path / "vzd.sock").running() as f:
        yield f


@pytest.fixture
def client(fake: FakeVzd, tmp_path: Path) -> Iterator[Client]:
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    with Client(fake.path, settings=settings, autostart=False, timeout=10) as c:
        yield c


@pytest.mark.parametrize(
    ("status", "code", "klass"),
    [
        (404, "not_found", NotFound),
        (409, "conflict", Conflict),
        (409, "invalid_state", StateError),
        (400, "invalid_config", InvalidConfig),
        (422, "image_error", ImageError),
        (500, "something_new", VzError),
    ],
)
def test_error_body_becomes_matching_exception(
    fake: FakeVzd, client: Client, status: int, code: str, klass: type[VzError]
) -> None:
    fake.on("GET", "/1.0/instances/web", error(status, code, "it broke", "do this"))
    with pytest.raises(klass) as info:
        client.get_instance("web")
    assert type(info.value) is klass
    assert info.value.message == "it broke"
    assert info.value.hint == "do this"


def test_framework_error_without_error_body(fake: FakeVzd, client: Client) -> None:
    fake.on("POST", "/1.0/instances", Reply(422, {"detail": [{"msg": "bad field"}]}))
    with pytest.raises(InvalidConfig, match="bad field"):
        client.create_instance({"image": "minimal"})


def test_typed_answers_and_one_keepalive_connection(fake: FakeVzd, client: Client) -> None:
    fake.on("GET", "/1.0/instances", Reply(200, [INSTANCE]))
    fake.on("GET", "/1.0/instances/web", Reply(200, INSTANCE))
    fake.on("GET", "/1.0", Reply(200, SERVER_INFO))
    assert client.server_info().pid == 1
    [inst] = client.list_instances()
    assert isinstance(inst, Instance) and inst.limits.memory == 512 * 1024**2
    assert client.get_instance("web").pid == 4242
    assert fake.connections == 1


def test_an_answer_this_client_cannot_read_is_a_version_skew(fake: FakeVzd, client: Client) -> None:
    fake.on("GET", "/1.0/instances", Reply(200, [{**INSTANCE, "state": "levitating"}]))
    with pytest.raises(VzError, match="list of Instance this client does not understand") as e:
        client.list_instances()
    assert "different versions" in (e.value.hint or "")
    fake.on("GET", "/1.0/instances", Reply(200, {"not": "a list"}))
    with pytest.raises(VzError, match="does not understand"):
        client.list_instances()


def test_create_sends_model_and_state_change(fake: FakeVzd, client: Client) -> None:
    fake.on("POST", "/1.0/instances", Reply(201, INSTANCE))
    fake.on("PUT", "/1.0/instances/web/state", Reply(200, {**INSTANCE, "state": "stopped"}))
    client.create_instance(InstanceCreate(name="web", limits={"memory": "1G"}))
    body = json.loads(fake.seen[0].body)
    assert body["name"] == "web" and body["limits"]["memory"] == 1024**3
    assert client.stop("web", force=True, timeout=5).state == "stopped"
    assert json.loads(fake.seen[1].body) == {"action": "stop", "force": True, "timeout": 5}


def test_delete_passes_force(fake: FakeVzd, client: Client) -> None:
    fake.on("DELETE", "/1.0/instances/web", Reply(204))
    client.delete_instance("web", force=True)
    client.delete_instance("web")
    assert [s.query for s in fake.seen] == [{"force": "true"}, {}]


def test_unreachable_without_autostart(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    settings = Settings(state_dir=tmp_path)
    with pytest.raises(DaemonUnavailable) as info:
        Client(sock, settings=settings, autostart=False).list_instances()
    assert str(sock) in info.value.message
    assert info.value.hint and "vz daemon start" in info.value.hint
    assert str(settings.daemon_log) in info.value.hint


def test_autostart_reports_a_daemon_that_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /bin/false stands in for the interpreter: the spawned "daemon" exits at once.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    settings = Settings(state_dir=tmp_path / "state")
    with pytest.raises(DaemonUnavailable, match="exited with status 1"):
        Client(tmp_path / "x.sock", settings=settings).server_info()
    assert settings.daemon_log.exists()


def _chatty(ws: ServerConnection) -> None:
    req = json.loads(ws.recv())
    assert req["argv"] == ["cat"] and req["stdin"] is True and req["env"] == {"A": "1"}
    got = b""
    while (msg := ws.recv()) != b"\x00":
        assert isinstance(msg, bytes) and msg[0] == 0
        got += msg[1:]
    ws.send(b"\x01" + got)
    ws.send(b"\x02" + b"warn\n")
    ws.send(json.dumps({"exit_code": 7}))
    ws.close()


def test_exec_streams_binary_both_ways(fake: FakeVzd, client: Client) -> None:
    fake.ws_routes["/1.0/instances/web/exec"] = _chatty
    payload = bytes(range(256)) * 1000
    res, out, err = client.exec_capture("web", ["cat"], env={"A": "1"}, stdin=payload)
    assert isinstance(res, ExecResult) and res.exit_code == 7
    assert out == payload and err == b"warn\n"


def test_exec_stdin_from_file_and_output_to_files(
    fake: FakeVzd, client: Client, tmp_path: Path
) -> None:
    fake.ws_routes["/1.0/instances/web/exec"] = _chatty
    src = tmp_path / "in"
    src.write_bytes(b"\x00\xff" * 100)
    out, err = io.BytesIO(), io.BytesIO()
    with src.open("rb") as f:
        res = client.exec("web", ["cat"], env={"A": "1"}, stdin=f, stdout=out, stderr=err)
    assert res.exit_code == 7 and out.getvalue() == b"\x00\xff" * 100


def test_exec_error_body_and_handshake_refusal(fake: FakeVzd, client: Client) -> None:
    def refuse(ws: ServerConnection) -> None:
        ws.recv()
        ws.send(json.dumps({"error": "'web' is stopped", "code": "invalid_state", "hint": "h"}))
        ws.close()

    fake.ws_routes["/1.0/instances/web/exec"] = refuse
    with pytest.raises(StateError, match="stopped"):
        client.exec("web", ["true"])
    with pytest.raises(NotFound, match="no route"):
        client.exec("ghost", ["true"])


def test_exec_without_result_is_an_agent_error(fake: FakeVzd, client: Client) -> None:
    def hang_up(ws: ServerConnection) -> None:
        ws.recv()
        ws.close()

    fake.ws_routes["/1.0/instances/web/exec"] = hang_up
    with pytest.raises(VzError, match="without a result"):
        client.exec("web", ["true"])


def test_build_image_reads_ndjson_progress(fake: FakeVzd, client: Client) -> None:
    lines = [
        {"progress": {"step": "fetch kernel", "fraction": 0.1}},
        {"progress": {"step": "pack initramfs", "fraction": None}},
        {"image": IMAGE},
    ]
    stream = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    fake.on("POST", "/1.0/images/minimal/build", Reply(200, stream, {"Content-Type": "x"}))
    seen: list[tuple[str, float | None]] = []
    info = client.build_image("minimal", force=True, progress=lambda s, f: seen.append((s, f)))
    assert isinstance(info, ImageInfo) and info.name == "minimal"
    assert seen == [("fetch kernel", 0.1), ("pack initramfs", None)]
    assert fake.seen[0].query == {"force": "true"}
    # The connection is still usable after a drained stream.
    fake.on("GET", "/1.0/images", Reply(200, [IMAGE]))
    assert [i.name for i in client.list_images()] == ["minimal"]


def test_build_image_error_line(fake: FakeVzd, client: Client) -> None:
    stream = (
        b'{"progress": {"step": "a", "fraction": 0.5}}\n'
        + json.dumps(
            {"error": {"error": "no kernel", "code": "host_unsupported", "hint": "apt install"}}
        ).encode()
        + b"\n"
    )
    fake.on("POST", "/1.0/images/minimal/build", Reply(200, stream))
    with pytest.raises(VzError, match="no kernel") as info:
        client.build_image("minimal")
    assert info.value.code == "host_unsupported" and info.value.hint == "apt install"


def test_files_push_and_pull(fake: FakeVzd, client: Client, tmp_path: Path) -> None:
    pushed: list[Seen] = []

    def store(seen: Seen) -> Reply:
        pushed.append(seen)
        return Reply(204)

    fake.on("PUT", "/1.0/instances/web/files", store)
    data = os.urandom(200_000)
    fake.on(
        "GET",
        "/1.0/instances/web/files",
        Reply(200, data, {"Content-Type": "application/octet-stream", "X-Vz-File-Mode": "0755"}),
    )
    client.push_file("web", "/a b", b"xyz", mode=0o600, parents=True)
    local = tmp_path / "f"
    local.write_bytes(data)
    with local.open("rb") as f:
        client.push_file("web", "/f", f)
    r, w = os.pipe()
    os.write(w, b"piped")
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        client.push_file("web", "/p", pipe)  # unknown size: sent chunked
    assert pushed[0].query == {"path": "/a b", "mode": "0600", "parents": "true"}
    assert pushed[0].body == b"xyz"
    assert pushed[1].body == data and pushed[1].headers["Content-Length"] == str(len(data))
    assert pushed[2].body == b"piped" and pushed[2].headers["Transfer-Encoding"] == "chunked"
    mode, chunks = client.pull_file("web", "/f")
    assert mode == 0o755 and b"".join(chunks) == data
    # An abandoned stream must not poison the next request.
    mode, chunks = client.pull_file("web", "/f")
    next(chunks)
    assert client.pull_file("web", "/f")[0] == 0o755


def test_run_deletes_even_when_the_block_fails(fake: FakeVzd, client: Client) -> None:
    fake.on("POST", "/1.0/instances", Reply(201, {**INSTANCE, "ephemeral": True}))
    fake.on("DELETE", "/1.0/instances/web", Reply(204))
    reqs: list[dict[str, object]] = []
    fake.ws_routes["/1.0/instances/web/exec"] = exec_script(b"hi\n", requests=reqs)
    with pytest.raises(RuntimeError), client.run("minimal", accel="tcg") as inst:
        assert inst.exec_capture(["echo", "hi"])[1] == b"hi\n"
        raise RuntimeError("boom")
    body = json.loads(fake.seen[0].body)
    assert body == {"image": "minimal", "ephemeral": True, "start": True, "accel": "tcg"}
    assert fake.seen[-1].method == "DELETE" and fake.seen[-1].query == {"force": "true"}


def test_async_client_runs_every_call_off_the_loop(fake: FakeVzd, tmp_path: Path) -> None:
    import asyncio

    import vzkit

    fake.on("GET", "/1.0/instances", Reply(200, [INSTANCE]))
    fake.on("GET", "/1.0/instances/web", Reply(200, INSTANCE))
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")

    async def main() -> tuple[Any, Any]:
        async with vzkit.AsyncClient(fake.path, settings=settings, autostart=False) as c:
            return await asyncio.gather(c.list_instances(), c.get_instance("web"))

    listed, one = asyncio.run(main())
    assert [i.name for i in listed] == ["web"] and one.name == "web"
    assert vzkit.Client is Client


# -- connections lost mid-request (issue 11: a replayed create) ---------------------------------


def _once_then(first: Reply, then: Reply, calls: list[Seen]) -> Callable[[Seen], Reply]:
    def answer(seen: Seen) -> Reply:
        calls.append(seen)
        return first if len(calls) == 1 else then

    return answer


def test_a_create_lost_mid_request_is_reported_not_sent_again(
    fake: FakeVzd, client: Client
) -> None:
    # vzd died after reading the request: it may have made the instance, so sending the
    # create again could only answer "already exists" (or make a second one).
    fake.on("GET", "/1.0/instances", Reply(200, []))
    posts: list[Seen] = []
    exists = error(409, "conflict", "instance 'web' already exists", "pick another name")
    fake.on("POST", "/1.0/instances", _once_then(Reply(drop=True), exists, posts))
    assert client.list_instances() == []  # the create goes on this kept-alive connection
    with pytest.raises(DaemonUnavailable) as info:
        client.create_instance({"name": "web"})
    assert len(posts) == 1
    assert "connection lost during POST /1.0/instances" in info.value.message
    assert "may or may not have carried out" in info.value.message
    assert info.value.hint and "check whether it was done" in info.value.hint


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_other_changes_lost_mid_request_are_not_sent_again(
    fake: FakeVzd, client: Client, method: str
) -> None:
    fake.on("GET", "/1.0/instances", Reply(200, []))
    calls: list[Seen] = []
    path = "/1.0/instances/web" + ("/state" if method == "PUT" else "")
    fake.on(method, path, _once_then(Reply(drop=True), Reply(200, INSTANCE), calls))
    client.list_instances()
    with pytest.raises(DaemonUnavailable, match=f"during {method} {path}"):
        if method == "PUT":
            client.start("web")
        else:
            client.delete_instance("web")
    assert len(calls) == 1


def test_a_read_lost_mid_request_is_sent_again_once(fake: FakeVzd, client: Client) -> None:
    gets: list[Seen] = []
    fake.on("GET", "/1.0/instances/web", _once_then(Reply(200, INSTANCE), Reply(drop=True), gets))
    fake.on("GET", "/1.0/instances", Reply(200, [INSTANCE]))
    client.get_instance("web")  # opens the connection the next call reuses
    fake.on("GET", "/1.0/instances/web", _once_then(Reply(drop=True), Reply(200, INSTANCE), []))
    assert client.get_instance("web").name == "web"  # replayed on a fresh connection
    assert fake.connections == 2


def test_a_connection_closed_while_idle_is_not_reused(fake: FakeVzd, client: Client) -> None:
    # The daemon closed the kept-alive connection after answering (a restart, a keep-alive
    # timeout): the next request, a create, must go on a new one, once.
    fake.on("GET", "/1.0/instances", Reply(200, [], hang_up=True))
    posts: list[Seen] = []
    fake.on("POST", "/1.0/instances", _once_then(Reply(201, INSTANCE), Reply(500), posts))
    client.list_instances()
    assert wait_for(lambda: fake.closed >= 1, 10)
    assert client.create_instance({"name": "web"}).name == "web"
    assert len(posts) == 1 and fake.connections == 2
