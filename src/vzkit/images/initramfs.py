"""The minimal image: the host's guest kernel plus a busybox initramfs whose /init starts the agent.

The initramfs is written in Python (newc cpio) rather than with ``cpio -o`` so that every
entry is owned by root with a zero mtime: the same inputs then give the same bytes, and the
content-addressed store shares the blob between images (the Debian image boots through the
very same initramfs).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Literal

from vzkit.errors import HostUnsupported, ImageError
from vzkit.guest.build import agent_binary
from vzkit.images.builder import BuildResult, Progress, sha256_file
from vzkit.settings import Settings

BUSYBOX = Path("/bin/busybox")

# Loaded by /init (directly or as dependencies); virtio_pci and its helpers serve the q35 VM.
MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "net_failover",
    "failover",
    "virtio_rng",
)

# Applets linked into the image. The kernel calls /sbin/modprobe for on-demand module
# loads, so the module tools live in /sbin; the rest in /bin.
_SBIN_APPLETS = (
    "modprobe", "insmod", "rmmod", "lsmod", "depmod", "switch_root", "poweroff", "reboot",
    "halt", "ip", "mdev", "blockdev", "losetup", "sysctl",
)  # fmt: skip
_BIN_APPLETS = (
    "sh", "ash", "mount", "umount", "mkdir", "rmdir", "ls", "cat", "echo", "uname", "hostname",
    "sleep", "usleep", "true", "false", "env", "id", "ps", "kill", "dd", "head", "tail", "wc",
    "sha256sum", "tty", "stty", "grep", "sed", "find", "chmod", "chown", "rm", "cp", "mv", "ln",
    "touch", "readlink", "dmesg", "df", "du", "free", "uptime", "date", "sync", "stat",
    "test", "[", "printf", "awk", "sort", "tr", "cut", "xargs", "tee", "which", "vi", "less",
    "gzip", "gunzip", "zcat", "tar", "ping", "nc", "wget", "hexdump", "od", "mktemp",
    "basename", "dirname", "seq", "expr", "timeout", "nproc", "pidof", "killall", "setsid",
    "nsenter", "unshare", "chroot", "top", "watch", "md5sum", "diff", "cmp",
)  # fmt: skip

# Measured under TCG (time to /init, median of 5): zstd -19 (1.09 MB) 0.99 s, gzip
# (1.24 MB) 1.10 s, lz4 (1.41 MB) 1.09 s, uncompressed (2.76 MB) 1.10 s. Loading the
# initrd into guest memory costs more than decompressing it, and zstd is both smallest
# and fastest to decompress. gzip is the fallback when the zstd tool is missing.
Compression = Literal["zstd", "gzip", "none"]
DEFAULT_COMPRESSION: Compression = "zstd"

_ETC_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_ETC_GROUP = "root:x:0:\ntty:x:5:\n"


def _release_key(release: str) -> tuple[int | str, ...]:
    # Natural order so 6.10 sorts after 6.9.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", release))


@dataclass(frozen=True)
class GuestKernel:
    path: Path
    release: str
    modules: Path


def find_kernel(settings: Settings) -> GuestKernel:
    """The newest cloud kernel in ``settings.kernel_dir`` (any vmlinuz-* as a fallback)."""
    hint = "install linux-image-cloud-amd64 (scripts/setup does this)"
    kdir = settings.kernel_dir
    candidates = sorted(kdir.glob("vmlinuz-*-cloud-amd64")) or sorted(kdir.glob("vmlinuz-*"))
    if not candidates:
        raise HostUnsupported(f"no guest kernel (vmlinuz-*) found in {kdir}", hint=hint)
    best = max(candidates, key=lambda p: _release_key(p.name.removeprefix("vmlinuz-")))
    release = best.name.removeprefix("vmlinuz-")
    modules = settings.modules_dir / release
    if not modules.is_dir():
        raise HostUnsupported(
            f"the modules of guest kernel {release} are missing: {modules} does not exist",
            hint=hint,
        )
    return GuestKernel(path=best, release=release, modules=modules)


def _module_files(modules_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko"):
        found[path.name.removesuffix(".ko").replace("-", "_")] = path
    return found


def _depends(module: Path) -> list[str]:
    # The .modinfo section holds a NUL-terminated "depends=a,b" string; reading it directly
    # spares a modinfo process per module.
    data = module.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends=") : end].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def resolve_modules(modules_dir: Path, names: tuple[str, ...] = MODULES) -> list[Path]:
    """The module files for ``names`` and everything they depend on."""
    available = _module_files(modules_dir)
    builtin = _builtin_modules(modules_dir)
    todo = [n.replace("-", "_") for n in names]
    done: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in done or name in builtin:
            continue
        path = available.get(name)
        if path is None:
            raise HostUnsupported(
                f"kernel module {name} not found under {modules_dir}",
                hint="install linux-image-cloud-amd64 (scripts/setup does this)",
            )
        done[name] = path
        todo.extend(_depends(path))
    return sorted(done.values())


def _builtin_modules(modules_dir: Path) -> set[str]:
    listing = modules_dir / "modules.builtin"
    if not listing.exists():
        return set()
    return {
        Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
        for line in listing.read_text().splitlines()
        if line.strip()
    }


def init_script() -> str:
    return resources.files("vzkit.images").joinpath("init.sh").read_text()


POWEROFF_INIT = "#!/bin/sh\nexec /sbin/poweroff -f\n"


def stage_root(
    root: Path,
    *,
    kernel: GuestKernel,
    busybox: Path,
    agent: Path,
    init: str | None,
) -> None:
    """Lay out the initramfs tree in ``root`` (an empty directory).

    With ``init=None`` the agent itself is /init: it mounts, loads modules and serves
    without forking a shell (fast under TCG), and hands disk images to /init.sh.
    """
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "newroot",
              "var", "mnt", "usr"):  # fmt: skip
        (root / d).mkdir()
    (root / "usr" / "bin").symlink_to("../bin")
    (root / "usr" / "sbin").symlink_to("../sbin")
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in _BIN_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for applet in _SBIN_APPLETS:
        (root / "sbin" / applet).symlink_to("../bin/busybox")
    shutil.copyfile(agent, root / "sbin" / "vz-agent")
    (root / "sbin" / "vz-agent").chmod(0o755)
    (root / "init.sh").write_text(init_script())
    (root / "init.sh").chmod(0o755)
    if init is None:
        (root / "init").symlink_to("sbin/vz-agent")
    else:
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
    (root / "etc" / "passwd").write_text(_ETC_PASSWD)
    (root / "etc" / "group").write_text(_ETC_GROUP)
    (root / "etc" / "hostname").write_text("vzkit\n")

    mod_root = root / "lib" / "modules" / kernel.release
    for src in resolve_modules(kernel.modules):
        dst = mod_root / src.relative_to(kernel.modules)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    for extra in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.modules / extra).exists():
            shutil.copyfile(kernel.modules / extra, mod_root / extra)
    run_depmod(root, kernel.release)


def run_depmod(root: Path, release: str) -> None:
    depmod = shutil.which("depmod") or "/usr/sbin/depmod"
    if not Path(depmod).exists():
        raise HostUnsupported("depmod not found", hint="install kmod (scripts/setup does this)")
    proc = subprocess.run([depmod, "-b", str(root), release], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(
            f"depmod failed for the guest modules: {proc.stderr.strip()[-1000:]}",
            hint="check that kmod is installed and the modules tree is readable",
        )


def _walk(root: Path) -> Iterator[Path]:
    # Sorted, parents before children: deterministic archives, and the kernel creates
    # directories before their contents.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        entries = sorted([*dirnames, *filenames])
        for name in entries:
            yield base / name


class _NewcWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1

    def entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nlink = 2 if stat.S_ISDIR(mode) else 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)  # fmt: skip
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def trailer(self) -> None:
        self.entry("TRAILER!!!", 0)


def write_cpio(root: Path, out: BinaryIO) -> None:
    """Write ``root`` as a newc archive, every entry owned by root with mtime 0."""
    w = _NewcWriter(out)
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            w.entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            w.entry(rel, stat.S_IFDIR | perm)
        elif stat.S_ISREG(st.st_mode):
            w.entry(rel, stat.S_IFREG | perm, path.read_bytes())
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    w.entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    w.trailer()


def pack(root: Path, out: Path, compression: Compression = DEFAULT_COMPRESSION) -> Path:
    if compression == "zstd" and shutil.which("zstd") is None:
        compression = "gzip"
    if compression == "zstd":
        buf = io.BytesIO()
        write_cpio(root, buf)
        with open(out, "wb") as f:
            proc = subprocess.run(
                ["zstd", "-19", "-q", "-c"], input=buf.getvalue(), stdout=f, stderr=subprocess.PIPE
            )
        if proc.returncode != 0:
            raise ImageError(
                f"zstd failed: {proc.stderr.decode(errors='replace').strip()[-500:]}",
                hint="install zstd (scripts/setup does this)",
            )
    elif compression == "gzip":
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            write_cpio(root, gz)  # type: ignore[arg-type]
    else:
        with open(out, "wb") as f:
            write_cpio(root, f)
    return out


def build_initramfs(
    out: Path,
    *,
    kernel: GuestKernel,
    busybox: Path,
    agent: Path,
    init: str | None,
    compression: Compression = DEFAULT_COMPRESSION,
) -> Path:
    """Build an initramfs at ``out``; the staging tree lives beside it and is removed."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        stage_root(root, kernel=kernel, busybox=busybox, agent=agent, init=init)
        return pack(root, out, compression)


def build_poweroff_initramfs(settings: Settings, out: Path) -> Path:
    """The boot benchmark's baseline: the same files, but /init powers off at once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_initramfs(
        out,
        kernel=find_kernel(settings),
        busybox=BUSYBOX,
        agent=agent_binary(settings),
        init=POWEROFF_INIT,
    )


class MinimalBuilder:
    """Builds the 'minimal' image: kernel + busybox initramfs that execs the agent."""

    kind = "initramfs"
    version = "1"

    def __init__(
        self,
        settings: Settings,
        *,
        busybox: Path = BUSYBOX,
        agent: Path | None = None,
        compression: Compression = DEFAULT_COMPRESSION,
    ) -> None:
        self.settings = settings
        self.busybox = busybox
        self._agent = agent
        self.compression = compression

    def agent(self) -> Path:
        if self._agent is None:
            self._agent = agent_binary(self.settings)
        return self._agent

    def inputs(self) -> dict[str, str]:
        kernel = find_kernel(self.settings)
        st = kernel.path.stat()
        if not self.busybox.exists():
            raise HostUnsupported(
                f"busybox not found at {self.busybox}",
                hint="install busybox-static (scripts/setup does this)",
            )
        return {
            "builder": f"minimal/{self.version}",
            "kernel": f"{kernel.path}:{st.st_size}:{st.st_mtime_ns}",
            "kernel_release": kernel.release,
            "modules": ",".join(MODULES),
            "busybox": sha256_file(self.busybox),
            "agent": sha256_file(self.agent()),
            "init": hashlib.sha256(init_script().encode()).hexdigest(),
            "compression": self.compression,
        }

    def build(self, workdir: Path, progress: Progress) -> BuildResult:
        kernel = find_kernel(self.settings)
        progress("copying the guest kernel", None)
        shutil.copyfile(kernel.path, workdir / "kernel")
        progress("building the initramfs", None)
        build_initramfs(
            workdir / "initrd",
            kernel=kernel,
            busybox=self.busybox,
            agent=self.agent(),
            init=None,
            compression=self.compression,
        )
        return BuildResult(
            files={"kernel": workdir / "kernel", "initrd": workdir / "initrd"},
            kernel_release=kernel.release,
        )
