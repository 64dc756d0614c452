"""The minimal image builder: kernel selection, module resolution, the cpio archive."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from vzkit.errors import HostUnsupported
from vzkit.images.initramfs import (
    MinimalBuilder,
    find_kernel,
    init_script,
    resolve_modules,
    write_cpio,
)
from vzkit.images.store import ImageStore
from vzkit.settings import Settings

RELEASE = "6.1.0-9-cloud-amd64"


def fake_module(path: Path, depends: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF-fake\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=x\0")


def fake_host(tmp_path: Path) -> Settings:
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel = bytearray(0x400)
    kernel[0x202:0x206] = b"HdrS"
    (boot / f"vmlinuz-{RELEASE}").write_bytes(bytes(kernel))
    (boot / "vmlinuz-5.10.0-1-cloud-amd64").write_bytes(bytes(kernel))
    mods = tmp_path / "modules" / RELEASE / "kernel"
    deps = {
        "drivers/virtio/virtio.ko": "virtio_ring",
        "drivers/virtio/virtio_ring.ko": "",
        "drivers/virtio/virtio_mmio.ko": "virtio,virtio_ring",
        "drivers/virtio/virtio_pci.ko": "virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
        "drivers/virtio/virtio_pci_modern_dev.ko": "",
        "drivers/virtio/virtio_pci_legacy_dev.ko": "",
        "drivers/char/virtio_console.ko": "virtio,virtio_ring",
        "drivers/block/virtio_blk.ko": "virtio,virtio_ring",
        "drivers/net/virtio_net.ko": "net_failover,virtio,virtio_ring",
        "drivers/net/net_failover.ko": "failover",
        "net/core/failover.ko": "",
        "drivers/char/hw_random/virtio-rng.ko": "virtio,virtio_ring",
        "fs/unrelated.ko": "",
    }
    for rel, dep in deps.items():
        fake_module(mods / rel, dep)
    return Settings(
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        kernel_dir=boot,
        modules_dir=tmp_path / "modules",
    )


def test_find_kernel_picks_the_newest_cloud_kernel(tmp_path: Path) -> None:
    settings = fake_host(tmp_path)
    k = find_kernel(settings)
    assert k.release == RELEASE
    assert k.path.name == f"vmlinuz-{RELEASE}"
    assert k.modules == settings.modules_dir / RELEASE


def test_missing_kernel_names_the_path_and_the_package(tmp_path: Path) -> None:
    settings = Settings(kernel_dir=tmp_path / "empty", modules_dir=tmp_path)
    with pytest.raises(HostUnsupported) as err:
        find_kernel(settings)
    assert str(tmp_path / "empty") in err.value.message
    assert err.value.hint == "install linux-image-cloud-amd64 (scripts/setup does this)"


def test_missing_modules_is_host_unsupported(tmp_path: Path) -> None:
    settings = fake_host(tmp_path)
    settings = Settings(kernel_dir=settings.kernel_dir, modules_dir=tmp_path / "nomods")
    with pytest.raises(HostUnsupported, match="modules"):
        find_kernel(settings)


def test_resolve_modules_follows_dependencies(tmp_path: Path) -> None:
    settings = fake_host(tmp_path)
    names = {p.name for p in resolve_modules(settings.modules_dir / RELEASE, ("virtio_net",))}
    assert names == {"virtio_net.ko", "net_failover.ko", "failover.ko", "virtio.ko",
                     "virtio_ring.ko"}  # fmt: skip
    all_names = {p.name for p in resolve_modules(settings.modules_dir / RELEASE)}
    assert "virtio-rng.ko" in all_names and "unrelated.ko" not in all_names
    with pytest.raises(HostUnsupported, match="nosuch"):
        resolve_modules(settings.modules_dir / RELEASE, ("nosuch",))


def test_cpio_is_newc_owned_by_root_and_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(b"x" * 5)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text("#!/bin/sh\n")
    (root / "init").chmod(0o755)
    first, second = io.BytesIO(), io.BytesIO()
    write_cpio(root, first)
    (root / "init").touch()  # mtimes do not reach the archive
    write_cpio(root, second)
    assert first.getvalue() == second.getvalue()
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=first.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert all(" root     root " in line for line in lines), listing
    assert any(line.endswith("bin/sh -> busybox") for line in lines)
    assert any(line.startswith("crw") and line.endswith("dev/console") for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" init") for line in lines)


def test_init_script_handles_root_and_agent() -> None:
    text = init_script()
    assert "exec /sbin/vz-agent --port-name org.vzkit.agent" in text
    assert "exec switch_root /newroot /sbin/init" in text
    assert "vz.hostname=" in text and "vz.root=" in text
    proc = subprocess.run(["busybox", "sh", "-n", "-c", text], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_minimal_builder_with_fake_host(tmp_path: Path) -> None:
    settings = fake_host(tmp_path)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"fake busybox")
    agent = tmp_path / "vz-agent"
    agent.write_bytes(b"fake agent")
    store = ImageStore(
        settings, {"minimal": lambda s: MinimalBuilder(s, busybox=busybox, agent=agent)}
    )
    info = store.build("minimal")
    assert info.kernel_release == RELEASE
    store.check(info, full=True)
    initrd = Path(info.files["initrd"]).read_bytes()
    cpio = subprocess.run(["zstd", "-dc"], input=initrd, capture_output=True, check=True).stdout
    names = (
        subprocess.run(["cpio", "-it", "--quiet"], input=cpio, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    for path in ("init", "sbin/vz-agent", "bin/busybox", "sbin/modprobe", "bin/sh",
                 "bin/sha256sum", "sbin/switch_root",
                 f"lib/modules/{RELEASE}/modules.dep",
                 f"lib/modules/{RELEASE}/kernel/net/core/failover.ko"):  # fmt: skip
        assert path in names, path
    # Same inputs: the same image; a new agent: a new initrd but the same kernel blob.
    assert store.build("minimal") == info
    agent.write_bytes(b"fake agent v2")
    rebuilt = store.build("minimal")
    assert rebuilt.files["kernel"] == info.files["kernel"]
    assert rebuilt.files["initrd"] != info.files["initrd"]
