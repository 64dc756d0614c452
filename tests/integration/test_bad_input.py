"""Bad input: a clear error with a hint, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import wait_for
from vzkit.api.instances import InstanceCreate
from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    ImageError,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
    StateError,
    VzError,
)
from vzkit.host import cgroups
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration


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
        r = vzd.vz(*args)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "error:" in err and message.lower() in err.lower(), err
    assert "hint:" in err and hint.lower() in err.lower(), err
    assert "Traceback" not in err


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


def test_qemu_failing_to_start_leaves_nothing(private_daemon: Daemon) -> None:
    real = shutil.which("qemu-system-x86_64")
    assert real
    # In the daemon's own (0755) root: QEMU runs as vz-qemu, who cannot enter pytest's tmp.
    fake = private_daemon.root / "qemu-broken"
    # Answers the probe's --version like QEMU, fails every launch like a broken install.
    fake.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && exec {real} --version\n'
        'echo "qemu: could not load PC BIOS" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    d = private_daemon
    d.env["VZ_QEMU"] = str(fake)
    d.start()
    c = d.client()
    with leaves_nothing(d), pytest.raises(EngineError) as e:
        c.create_instance(InstanceCreate(name="broken"))
    assert "could not load PC BIOS" in str(e.value)
    assert not list(d.settings.instance_runtime_dir.glob("*"))
    assert cgroups.detect().open(d.settings.instance_cgroup("broken")) is None


def test_qemu_dying_during_boot_leaves_nothing(private_daemon: Daemon) -> None:
    d = private_daemon
    d.start()
    c = d.client()
    c.build_image("minimal")
    errors: list[BaseException] = []

    def create() -> None:
        try:
            c.create_instance(InstanceCreate(name="doomed"))
        except BaseException as exc:
            errors.append(exc)

    with leaves_nothing(d):
        t = threading.Thread(target=create)
        t.start()

        # Booting: QEMU has daemonized (pid file written) and its launcher has exited.
        def booting() -> bool:
            pid_files = list(d.settings.instance_runtime_dir.glob("*/qemu.pid"))
            return bool(pid_files) and pid_files[0].stat().st_size > 0 and len(d.qemu_pids()) == 1

        assert wait_for(booting, 30)
        pid_file = next(d.settings.instance_runtime_dir.glob("*/qemu.pid"))
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        t.join(60)
        assert wait_for(lambda: not d.qemu_pids(), 5)
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    assert "exited while 'doomed' was booting" in str(errors[0])
    assert not list(d.settings.instance_runtime_dir.glob("*"))
