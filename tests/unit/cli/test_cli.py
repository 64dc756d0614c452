"""``vz`` end to end in a subprocess (real argv, stdio and exit codes) against a fake vzd."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from websockets.sync.server import ServerConnection

from tests.unit.cli.vz_fake_daemon import (
    HOST_INFO,
    IMAGE,
    INSTANCE,
    SERVER_INFO,
    FakeVzd,
    Reply,
    Seen,
    error,
    exec_script,
)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVzd]:
    with FakeVzd(tmp_path / "vzd.sock").running() as f:
        yield f


def vz(
    tmp_path: Path, *args: str, sock: Path | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "VZ_STATE_DIR": str(tmp_path / "state"),
        "VZ_RUNTIME_DIR": str(tmp_path / "run"),
        "VZ_SOCKET": str(sock or tmp_path / "vzd.sock"),
    }
    return subprocess.run(
        [sys.executable, "-m", "vzkit.cli.main", "--no-autostart", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=env,
        timeout=60,
    )


def test_unreachable_daemon_prints_error_and_hint(tmp_path: Path) -> None:
    r = vz(tmp_path, "list", sock=tmp_path / "missing.sock")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"error: cannot reach vzd at {tmp_path / 'missing.sock'}" in err
    assert "hint: see " in err and "vz daemon start" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "Bad_Image", "--", "true"], "invalid image name"),
        (["run", "minimal", "--memory", "lots", "--", "true"], "invalid size"),
        (["run", "minimal", "--memory", "1", "--", "true"], "too small"),
        (["run", "minimal", "--env", "NOEQUALS", "--", "true"], "invalid --env"),
        (["run", "minimal"], "no command given"),
        (["run", "minimal", "--cpus", "0", "--", "true"], "out of range"),
        (["launch", "minimal", "UPPER"], "invalid instance name"),
        (["exec", "web", "--timeout", "-1", "--", "true"], "must be positive"),
        (["file", "push", "/etc/hostname", "web"], "NAME:/path"),
        (["file", "push", "/etc/hostname", "web:relative"], "not absolute"),
        (["file", "push", "/etc/hostname", "web:/x", "--mode", "999"], "invalid --mode"),
        (["file", "pull", "web:/x", "/nonexistent-dir/y"], "not a directory"),
        (["delete", "ok", "NOT-OK"], "invalid instance name"),
    ],
)
def test_bad_input_is_refused_locally(
    fake: FakeVzd, tmp_path: Path, args: list[str], needle: str
) -> None:
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    r = vz(tmp_path, *args)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert needle in err and "\nhint: " in err
    assert fake.seen == []


def test_usage_error_exits_2(tmp_path: Path) -> None:
    r = vz(tmp_path, "frobnicate")
    assert r.returncode == 2 and r.stderr.startswith(b"error: ")


def test_daemon_error_is_printed_with_hint(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on(
        "PUT",
        "/1.0/instances/web/state",
        error(409, "invalid_state", "cannot pause 'web': it is stopped", "start it first"),
    )
    r = vz(tmp_path, "pause", "web")
    assert r.returncode == 1
    assert r.stderr == b"error: cannot pause 'web': it is stopped\nhint: start it first\n"
    r = vz(tmp_path, "--debug", "pause", "web")
    assert b"Traceback" in r.stderr and r.returncode == 1


def test_list_table_and_json(fake: FakeVzd, tmp_path: Path) -> None:
    limits = {"cpus": 1, "memory": 1024**3, "cpu_weight": 100, "cpu_pin": None}
    other = {
        **INSTANCE,
        "name": "db",
        "state": "stopped",
        "pid": None,
        "type": "vm",
        "limits": limits,
        "nics": [],
    }
    fake.on("GET", "/1.0/instances", Reply(200, [INSTANCE, other]))
    r = vz(tmp_path, "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    head = ["NAME", "TYPE", "STATE", "IMAGE", "CPUS", "MEMORY", "IPV4", "PID", "AGE"]
    assert lines[0].split() == head
    assert lines[1].split()[:8] == ["db", "vm", "stopped", "minimal", "1", "1GiB", "-", "-"]
    web = ["web", "microvm", "running", "minimal", "2", "512MiB", "10.80.0.10", "4242"]
    assert lines[2].split()[:8] == web
    assert lines[2].split()[8].endswith("d")
    # Columns line up.
    assert lines[0].index("STATE") == lines[1].index("stopped") == lines[2].index("running")
    r = vz(tmp_path, "list", "--format", "json")
    data = json.loads(r.stdout)
    assert [d["name"] for d in data] == ["web", "db"] and data[0]["limits"]["memory"] == 512 * 2**20


def test_info_key_values_and_json(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0/instances/web", Reply(200, INSTANCE))
    out = vz(tmp_path, "info", "web").stdout.decode()
    assert "memory:" in out and "512MiB" in out and "pid:" in out and "4242" in out
    data = json.loads(vz(tmp_path, "--format", "json", "info", "web").stdout)
    assert data["name"] == "web" and data["accel"] == "tcg"


def _run_routes(fake: FakeVzd, name: str) -> None:
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    fake.on(
        "POST",
        "/1.0/instances",
        lambda s: Reply(201, {**INSTANCE, "name": json.loads(s.body)["name"]}),
    )
    fake.on("DELETE", f"/1.0/instances/{name}", Reply(204))


def test_run_passes_exit_code_and_binary_output_then_deletes(fake: FakeVzd, tmp_path: Path) -> None:
    _run_routes(fake, "job")
    blob = bytes(range(256)) * 64 + b"\r\n\x00"
    reqs: list[dict[str, object]] = []
    fake.ws_routes["/1.0/instances/job/exec"] = exec_script(
        blob, b"to stderr", exit_code=3, echo_stdin=True, requests=reqs
    )
    r = vz(
        tmp_path,
        "run",
        "minimal",
        "--name",
        "job",
        "--memory",
        "1G",
        "--env",
        "A=b=c",
        "--",
        "sh",
        "-c",
        "exit 3",
        "--not-an-option",
        input=b"IN",
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == blob + b"IN"
    assert r.stderr == b"to stderr"
    assert reqs[0]["argv"] == ["sh", "-c", "exit 3", "--not-an-option"]
    assert reqs[0]["env"] == {"A": "b=c"} and reqs[0]["stdin"] is True
    create = json.loads(fake.seen[1].body)
    assert create["ephemeral"] is True and create["start"] is True
    assert create["limits"] == {"memory": 1024**3}
    assert fake.requests("DELETE") == [("DELETE", "/1.0/instances/job")]
    assert fake.seen[-1].query == {"force": "true"}


def test_run_deletes_when_exec_fails(fake: FakeVzd, tmp_path: Path) -> None:
    _run_routes(fake, "job")

    def fail(ws: ServerConnection) -> None:
        ws.recv()
        ws.send(json.dumps({"error": "agent gone", "code": "agent_error", "hint": "see log"}))
        ws.close()

    fake.ws_routes["/1.0/instances/job/exec"] = fail
    r = vz(tmp_path, "run", "minimal", "--name", "job", "--", "true")
    assert r.returncode == 1
    assert r.stderr == b"error: agent gone\nhint: see log\n"
    assert fake.requests("DELETE") == [("DELETE", "/1.0/instances/job")]


def test_run_keep_and_failed_create_do_not_delete(fake: FakeVzd, tmp_path: Path) -> None:
    _run_routes(fake, "job")
    fake.ws_routes["/1.0/instances/job/exec"] = exec_script(b"ok")
    r = vz(tmp_path, "run", "minimal", "--name", "job", "--keep", "--", "true")
    assert r.returncode == 0 and b"kept instance job" in r.stderr
    fake.on("POST", "/1.0/instances", error(409, "conflict", "'job' exists", "pick another"))
    r = vz(tmp_path, "run", "minimal", "--name", "job", "--", "true")
    assert r.returncode == 1 and b"'job' exists" in r.stderr
    assert fake.requests("DELETE") == []


def test_run_builds_a_missing_image_with_progress(fake: FakeVzd, tmp_path: Path) -> None:
    _run_routes(fake, "job")
    fake.on("GET", "/1.0/images/minimal", error(404, "not_found", "image not built", "build"))
    stream = b"".join(
        json.dumps(x).encode() + b"\n"
        for x in [
            {"progress": {"step": "kernel", "fraction": 0.25}},
            {"progress": {"step": "initramfs", "fraction": 0.9}},
            {"image": IMAGE},
        ]
    )
    fake.on("POST", "/1.0/images/minimal/build", Reply(200, stream))
    fake.ws_routes["/1.0/instances/job/exec"] = exec_script(exit_code=0)
    r = vz(tmp_path, "run", "minimal", "--name", "job", "--", "true")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines() == [
        "building image minimal: kernel (25%)",
        "building image minimal: initramfs (90%)",
    ]


def test_run_ctrl_c_forwards_then_deletes(fake: FakeVzd, tmp_path: Path) -> None:
    _run_routes(fake, "job")
    signalled = threading.Event()
    got_signal: list[int] = []

    def long_running(ws: ServerConnection) -> None:
        ws.recv()
        # Output the client prints only from inside its exec loop, where Ctrl-C is forwarded.
        ws.send(b"\x01ready\n")
        for msg in ws:
            if isinstance(msg, str) and "signal" in msg:
                got_signal.append(json.loads(msg)["signal"])
                signalled.set()
                if len(got_signal) == 1:
                    continue  # ignore the first: the user must press Ctrl-C again
        ws.close()

    fake.ws_routes["/1.0/instances/job/exec"] = long_running
    env = {**os.environ, "VZ_SOCKET": str(fake.path), "VZ_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vzkit.cli.main",
            "--no-autostart",
            "run",
            "minimal",
            "--name",
            "job",
            "--",
            "sleep",
            "100",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert _read_line(proc.stdout, 30) == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert signalled.wait(30)
        assert got_signal == [2]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.communicate()
    assert fake.requests("DELETE") == [("DELETE", "/1.0/instances/job")]


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """A line from a child's pipe, or b"" if none comes within ``timeout`` seconds."""
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else b""


def test_exec_stdin_and_exit_code(fake: FakeVzd, tmp_path: Path) -> None:
    reqs: list[dict[str, object]] = []
    fake.ws_routes["/1.0/instances/web/exec"] = exec_script(
        exit_code=42, echo_stdin=True, requests=reqs
    )
    data = os.urandom(100_000)
    r = vz(tmp_path, "exec", "web", "--workdir", "/tmp", "--", "cat", input=data)
    assert r.returncode == 42 and r.stdout == data
    assert reqs[0]["cwd"] == "/tmp" and reqs[0]["tty"] is False


def test_file_push_pull(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("PUT", "/1.0/instances/web/files", Reply(204))
    fake.on(
        "GET", "/1.0/instances/web/files", Reply(200, b"\x00remote\xff", {"X-Vz-File-Mode": "0750"})
    )
    local = tmp_path / "script"
    local.write_bytes(b"#!/bin/sh\n")
    local.chmod(0o711)
    assert vz(tmp_path, "file", "push", str(local), "web:/usr/bin/s", "-p").returncode == 0
    put = fake.seen[-1]
    assert put.query == {"path": "/usr/bin/s", "mode": "0711", "parents": "true"}
    assert put.body == b"#!/bin/sh\n"
    assert vz(tmp_path, "file", "push", "-", "web:/x", input=b"stdin!").returncode == 0
    assert fake.seen[-1].body == b"stdin!" and fake.seen[-1].query["mode"] == "0644"
    r = vz(tmp_path, "file", "pull", "web:/etc/thing", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "thing").read_bytes() == b"\x00remote\xff"
    assert (tmp_path / "thing").stat().st_mode & 0o777 == 0o750
    assert vz(tmp_path, "file", "pull", "web:/etc/thing", "-").stdout == b"\x00remote\xff"


def test_delete_many_continues_past_failures(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("DELETE", "/1.0/instances/a", Reply(204))
    fake.on("DELETE", "/1.0/instances/b", error(404, "not_found", "no instance 'b'", "vz list"))
    fake.on("DELETE", "/1.0/instances/c", Reply(204))
    r = vz(tmp_path, "delete", "a", "b", "c", "--force")
    assert r.returncode == 1
    assert r.stdout == b"a: deleted\nc: deleted\n"
    assert r.stderr == b"error: no instance 'b'\nhint: vz list\n"
    assert all(s.query == {"force": "true"} for s in fake.seen)


def test_image_list_and_host_info(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0/images", Reply(200, [IMAGE]))
    fake.on("GET", "/1.0/host", Reply(200, HOST_INFO))
    lines = vz(tmp_path, "image", "list").stdout.decode().splitlines()
    assert lines[1].split()[:4] == ["minimal", "initramfs", "6.1.0-cloud-amd64", "3MiB"]
    out = vz(tmp_path, "host", "info").stdout.decode()
    assert re.search(r"^kvm\.usable: +False$", out, re.M) and re.search(r"^cpus: +2$", out, re.M)
    assert json.loads(vz(tmp_path, "host", "info", "--format", "json").stdout)["cpus"] == 2


def test_daemon_status(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("GET", "/1.0", Reply(200, {**SERVER_INFO, "pid": 9}))
    r = vz(tmp_path, "daemon", "status")
    assert r.returncode == 0 and b"running (pid 9, version 0.1" in r.stdout
    r = vz(tmp_path, "daemon", "status", sock=tmp_path / "none.sock")
    assert r.returncode == 3 and r.stdout.startswith(b"not running")


def test_a_launch_lost_mid_request_is_not_sent_again(fake: FakeVzd, tmp_path: Path) -> None:
    # vzd died after reading the create: the CLI once sent it again on a fresh connection
    # and printed "instance already exists" for a launch that had failed.
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    posts: list[Seen] = []

    def create(seen: Seen) -> Reply:
        posts.append(seen)
        if len(posts) == 1:
            return Reply(drop=True)
        return error(409, "conflict", "instance 'web' already exists", "pick another name")

    fake.on("POST", "/1.0/instances", create)
    r = vz(tmp_path, "launch", "minimal", "web")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert len(posts) == 1
    assert "already exists" not in err
    assert "error: cannot reach vzd at" in err and "connection lost during POST" in err
    assert "hint: check whether it was done" in err


def test_sizes_up_to_one_pib_reach_the_daemon(fake: FakeVzd, tmp_path: Path) -> None:
    # The API documents sizes up to 1 PiB; the CLI refused "1PiB" as no size at all.
    fake.on("GET", "/1.0/images/minimal", Reply(200, IMAGE))
    fake.on(
        "POST",
        "/1.0/instances",
        error(507, "resource_exhausted", "cannot allocate 1PiB of memory", "use less"),
    )
    fake.on("POST", "/1.0/volumes", error(507, "resource_exhausted", "pool full", "free space"))
    r = vz(tmp_path, "launch", "minimal", "big", "--memory", "1PiB")
    assert r.returncode == 1 and b"cannot allocate 1PiB" in r.stderr, r.stderr
    assert json.loads(fake.seen[-1].body)["limits"] == {"memory": 1024**5}
    r = vz(tmp_path, "volume", "create", "huge", "--size", "1PiB")
    assert r.returncode == 1 and json.loads(fake.seen[-1].body)["size"] == 1024**5
    posts = len(fake.requests("POST"))
    r = vz(tmp_path, "launch", "minimal", "big", "--memory", "2PiB")
    assert r.returncode == 2 and b"invalid size '2PiB': at most 1PiB" in r.stderr, r.stderr
    assert len(fake.requests("POST")) == posts


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["launch", "minimal", "--memory", "64MiB"], "too small for a microvm: at least 96MiB"),
        (["launch", "minimal", "--type", "vm", "--memory", "96MiB"], "at least 128MiB"),
        (["launch", "minimal", "--type", "container", "--memory", "4MiB"], "at least 8MiB"),
        (["config", "set", "web", "limits.memory=1MiB"], "too small"),
        (["volume", "create", "v", "--size", "512KiB"], "out of range"),
        (["stop", "web", "--timeout", "7200"], "too long"),
        (["file", "push", "-", "web:/x", "--mode", "4755"], "setuid or setgid"),
    ],
)
def test_the_cli_refuses_what_the_api_refuses(
    fake: FakeVzd, tmp_path: Path, args: list[str], needle: str
) -> None:
    r = vz(tmp_path, *args)
    assert r.returncode == 2 and needle in r.stderr.decode(), r.stderr
    assert b"\nhint: " in r.stderr
    assert fake.seen == []


def test_a_setuid_file_is_pushed_only_when_asked_for(fake: FakeVzd, tmp_path: Path) -> None:
    fake.on("PUT", "/1.0/instances/web/files", Reply(204))
    local = tmp_path / "tool"
    local.write_bytes(b"#!/bin/sh\n")
    local.chmod(0o4755)
    r = vz(tmp_path, "file", "push", str(local), "web:/usr/bin/tool")
    assert r.returncode == 2 and b"4755 sets the setuid or setgid bit" in r.stderr, r.stderr
    assert fake.seen == []
    r = vz(tmp_path, "file", "push", str(local), "web:/usr/bin/tool", "--allow-setid")
    assert r.returncode == 0, r.stderr
    assert fake.seen[-1].query["mode"] == "4755" and fake.seen[-1].query["allow_setid"] == "true"
