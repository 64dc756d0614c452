"""Bad input: a clear error with a hint, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup, _make_daemon
from vzkit.client import Client
from vzkit.errors import (
    Conflict,
    HostUnsupported,
    ImageError,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
    StateError,
    VzError,
)
from vzkit.models import InstanceCreate

pytestmark = pytest.mark.integration


def vz(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vzkit.cli.main", *args],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(d: Daemon) -> tuple[list[str], list[int], list[str]]:
    c = d.client()
    inst_dirs = sorted(p.name for p in d.settings.instances_dir.glob("*"))
    return [i.name for i in c.list_instances()], d.qemu_pids(), inst_dirs


@contextlib.contextmanager
def leaves_nothing(d: Daemon) -> Iterator[None]:
    before = snapshot(d)
    yield
    assert snapshot(d) == before


@pytest.mark.parametrize(
    "args, message, hint",
    [
        (["launch", "minimal", "Bad_Name"], "invalid instance name", "lowercase"),
        (["launch", "minimal", "web_1"], "invalid instance name", "lowercase"),
        (["launch", "no-such-image", "n1"], "unknown image 'no-such-image'", "minimal"),
        (["launch", "minimal", "big", "--memory", "4TiB"], "cannot allocate", "--memory"),
        (["launch", "minimal", "many", "--cpus", "64"], "cpu", "--cpus"),
        (["launch", "minimal", "m", "--memory", "lots"], "invalid size", "512MiB"),
        (["info", "ghost"], "instance 'ghost' not found", "vz list"),
        (["exec", "ghost", "--", "true"], "instance 'ghost' not found", "vz list"),
        (["delete", "ghost"], "instance 'ghost' not found", "vz list"),
    ],
)
def test_cli_bad_input(vzd: Daemon, args: list[str], message: str, hint: str) -> None:
    with leaves_nothing(vzd):
        r = vz(vzd, *args)
    assert r.returncode != 0
    assert "error:" in r.stderr and message.lower() in r.stderr.lower(), r.stderr
    assert "hint:" in r.stderr and hint.lower() in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_api_errors_are_typed(vzd: Daemon, client: Client) -> None:
    with leaves_nothing(vzd):
        with pytest.raises(NotFound):
            client.get_instance("ghost")
        with pytest.raises(NotFound) as nf:
            client.create_instance(InstanceCreate(name="x1", image="nope"))
        assert nf.value.hint
        with pytest.raises(ResourceExhausted) as re_:
            client.create_instance(
                InstanceCreate.model_validate({"name": "x2", "limits": {"memory": "10TiB"}})
            )
        assert "memory" in str(re_.value)
        with pytest.raises((InvalidConfig, VzError)):
            client.create_instance(InstanceCreate.model_construct(name="UPPER"))


def test_duplicate_name_and_wrong_state(vzd: Daemon, client: Client) -> None:
    client.create_instance(InstanceCreate(name="dup", start=False))
    with leaves_nothing(vzd):
        with pytest.raises(Conflict) as e:
            client.create_instance(InstanceCreate(name="dup"))
        assert "already exists" in str(e.value) and e.value.hint
        with pytest.raises(StateError) as s:
            client.pause("dup")
        assert str(s.value) == "cannot pause 'dup': it is stopped"
        assert s.value.hint == "start it first: vz start dup"
        with pytest.raises(StateError):
            client.exec_capture("dup", ["true"])
    client.delete_instance("dup")


@pytest.fixture
def private_daemon(image_cache: Path) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="vzt-"))
    d = _make_daemon(root, image_cache)
    try:
        yield d
    finally:
        _cleanup(d)
        shutil.rmtree(root, ignore_errors=True)


def test_corrupt_image_is_refused(private_daemon: Daemon) -> None:
    d = private_daemon
    d.start()
    c = d.client()
    c.build_image("minimal")
    initrd = Path(c.get_image("minimal").files["initrd"])
    with open(initrd, "r+b") as f:
        f.truncate(os.path.getsize(initrd) // 2)
    with leaves_nothing(d), pytest.raises(ImageError) as e:
        c.create_instance(InstanceCreate(name="corrupt"))
    assert "corrupt" in str(e.value) and e.value.hint and "--force" in e.value.hint
    c.build_image("minimal", force=True)
    c.create_instance(InstanceCreate(name="healed"))
    assert c.exec_capture("healed", ["true"])[0].exit_code == 0


def test_missing_kernel(private_daemon: Daemon, tmp_path: Path) -> None:
    d = private_daemon
    d.env["VZ_KERNEL_DIR"] = str(tmp_path)
    d.start()
    c = d.client()
    with leaves_nothing(d), pytest.raises(HostUnsupported) as e:
        c.create_instance(InstanceCreate(name="nokernel"))
    assert str(tmp_path) in str(e.value) and e.value.hint
    assert "linux-image-cloud-amd64" in e.value.hint
