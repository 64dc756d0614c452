"""Build the real images and boot them under QEMU (TCG) until the agent says HELLO."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.api.instances import ImageInfo
from vzkit.images import ImageStore
from vzkit.images.initramfs import build_poweroff_initramfs
from vzkit.settings import Settings

pytestmark = pytest.mark.integration

HELLO = 0x01


def host_tsc_khz() -> int:
    """The host's TSC frequency; the guest needs it to skip PIT calibration (hangs under load)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return round(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


def cmdline(info: ImageInfo, hostname: str = "vz-test") -> str:
    parts = [
        "console=ttyS0",
        "quiet",
        f"tsc_early_khz={host_tsc_khz()}",
        "tsc=reliable",
        "panic=-1",
        "rdinit=/init",
        f"vz.hostname={hostname}",
    ]
    if "cmdline" in info.files:
        parts.append(info.files["cmdline"])
    return " ".join(parts)


def boot_to_hello(info: ImageInfo, workdir: Path, timeout: float = 120.0) -> tuple[float, bytes]:
    """Boot ``info`` and return (seconds to the agent's first frame header, that header).

    The test listens and QEMU connects as the socket client, so no frame can be written
    before anyone reads it.
    """
    sock_path = workdir / f"agent-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    listener.settimeout(timeout)
    argv = [
        "qemu-system-x86_64", "-M", "microvm,accel=tcg", "-cpu", "max", "-m", "256",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{workdir / 'console.log'}",
        "-kernel", info.files["kernel"], "-initrd", info.files["initrd"],
        "-append", cmdline(info),
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={sock_path}",
        "-device", "virtserialport,chardev=agent,name=org.vzkit.agent",
    ]  # fmt: skip
    if "rootfs" in info.files:
        argv += [
            "-drive", f"file={info.files['rootfs']},if=none,id=root,format=qcow2,snapshot=on",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
    start = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(max(1.0, timeout - (time.monotonic() - start)))
            header = b""
            while len(header) < 12:
                chunk = conn.recv(12 - len(header))
                assert chunk, "the agent port closed before a frame arrived"
                header += chunk
            elapsed = time.monotonic() - start
    except TimeoutError:
        log = (workdir / "console.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"no agent frame within {timeout}s; console:\n{log}")
    finally:
        qemu.kill()
        qemu.wait()
        listener.close()
        sock_path.unlink(missing_ok=True)
    return elapsed, header


def assert_hello(header: bytes) -> None:
    magic, version, ftype, stream, _length = struct.unpack(">HBBII", header)
    assert magic == 0x565A
    assert version == 1
    assert ftype == HELLO
    assert stream == 0


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="vz-images-"))
    try:
        yield Settings(
            state_dir=tmp / "state",
            runtime_dir=tmp / "run",
            # The agent build cache and the mmdebstrap tarball may be shared between runs.
            cache_dir=Path(os.environ.get("VZ_TEST_CACHE_DIR", str(tmp / "cache"))),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_minimal_boots_to_agent_hello(settings: Settings, tmp_path: Path) -> None:
    store = ImageStore(settings)
    start = time.monotonic()
    info = store.build("minimal")
    build_s = time.monotonic() - start
    store.check(info, full=True)
    times = []
    for _ in range(3):
        elapsed, header = boot_to_hello(info, tmp_path, timeout=60)
        assert_hello(header)
        times.append(elapsed)
    print(
        f"\nminimal: build {build_s:.2f}s, initrd {Path(info.files['initrd']).stat().st_size} "
        f"bytes, boot-to-HELLO median {statistics.median(times):.3f}s ({times})"
    )


def test_poweroff_baseline_exits_at_once(settings: Settings, tmp_path: Path) -> None:
    initrd = build_poweroff_initramfs(settings, tmp_path / "poweroff.img")
    info = ImageStore(settings).ensure("minimal")
    start = time.monotonic()
    argv = [
        "qemu-system-x86_64", "-M", "microvm,accel=tcg", "-cpu", "max", "-m", "256",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", info.files["kernel"], "-initrd", str(initrd), "-append", cmdline(info),
    ]  # fmt: skip
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    print(f"\npoweroff baseline: {time.monotonic() - start:.3f}s")


@pytest.mark.slow
def test_debian_boots_to_agent_hello(settings: Settings, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("the debian build needs root and mmdebstrap")
    store = ImageStore(settings)
    start = time.monotonic()
    info = store.build("debian")
    build_s = time.monotonic() - start
    store.check(info)
    minimal = store.ensure("minimal")
    # The kernel and the initramfs are one blob each, shared by both images.
    assert info.files["kernel"] == minimal.files["kernel"]
    assert info.files["initrd"] == minimal.files["initrd"]
    assert info.files["cmdline"] == "vz.root=/dev/vda"
    elapsed, header = boot_to_hello(info, tmp_path, timeout=180)
    assert_hello(header)
    print(f"\ndebian: build {build_s:.1f}s, boot-to-HELLO {elapsed:.2f}s, size {info.size}")
