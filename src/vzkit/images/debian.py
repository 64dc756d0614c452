"""The 'debian' image: a Debian bookworm root disk (qcow2) booted with systemd.

It boots with the same kernel and initramfs as 'minimal' plus ``vz.root=/dev/vda``: the
initramfs loads virtio_blk, mounts the disk and switches root to systemd, which starts the
agent from ``vz-agent.service``.

The mmdebstrap tarball (the slow, network-bound part) is cached in ``settings.cache_dir``
by its package list and mirrors, so a rebuild after an agent change only re-customizes and
re-packs the tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vzkit.errors import HostUnsupported, ImageError
from vzkit.guest.protocol import AGENT_PORT_NAME
from vzkit.images.builder import BuildResult, Progress
from vzkit.images.initramfs import (
    BUSYBOX,
    DEFAULT_COMPRESSION,
    MinimalBuilder,
    build_initramfs,
    find_kernel,
    run_depmod,
)
from vzkit.settings import Settings

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "python3-minimal",
    "procps",
)
DISK_SIZE = "2G"
ROOT_DEVICE = "/dev/vda"
APT_SOURCES = Path("/etc/apt")

AGENT_UNIT = f"""\
[Unit]
Description=vzkit guest agent
# Started as early as systemd can: the host waits for the agent's HELLO to call the guest
# up. The initramfs already loaded the virtio modules and the root is mounted read-write.
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/sbin/vz-agent --port-name {AGENT_PORT_NAME}
Restart=always
RestartSec=200ms

[Install]
WantedBy=sysinit.target
"""

FSTAB = f"{ROOT_DEVICE} / ext4 defaults,errors=remount-ro 0 1\n"


def apt_mirrors(apt_dir: Path = APT_SOURCES, suite: str = SUITE) -> list[str]:
    """One-line ``deb URI SUITE COMPONENTS`` entries for ``suite`` from the host's sources.

    Only the host's configured mirror is reachable, so the rootfs is fetched from it too.
    """
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    entries: list[tuple[str, str, str]] = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            # Options like [signed-by=...] do not matter to mmdebstrap's mirror line.
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb":
                entries.append((words[1], words[2], " ".join(words[3:])))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        if path.is_file():
            entries.extend(_deb822(path.read_text()))
    mirrors = []
    for uri, s, components in entries:
        if s in wanted and f"deb {uri} {s} {components}" not in mirrors:
            mirrors.append(f"deb {uri} {s} {components}")
    if not any(m.split()[2] == suite for m in mirrors):
        raise HostUnsupported(
            f"no Debian {suite} mirror is configured in {apt_dir}/sources.list[.d]",
            hint=f"add a deb entry for {suite} main to the host's apt sources",
        )
    return mirrors


def _deb822(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for s in fields.get("suites", "").split():
                out.append((uri, s, fields.get("components", "main")))
    return out


# mmdebstrap's phases, in order, as (message prefix, fraction done when it starts).
_MMDEBSTRAP_PHASES = (
    ("I: chroot architecture", 0.02),
    ("I: running apt-get update", 0.05),
    ("I: downloading packages", 0.15),
    ("I: extracting archives", 0.35),
    ("I: installing essential", 0.45),
    ("I: installing remaining", 0.65),
    ("I: cleaning package lists", 0.9),
    ("I: creating tarball", 0.93),
    ("I: done", 1.0),
)


def _run(argv: list[str], what: str, hint: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {proc.stderr.strip()[-2000:]}", hint=hint)


class DebianBuilder:
    kind = "disk"
    version = "1"

    def __init__(
        self,
        settings: Settings,
        *,
        busybox: Path = BUSYBOX,
        agent: Path | None = None,
        packages: tuple[str, ...] = PACKAGES,
        apt_dir: Path = APT_SOURCES,
    ) -> None:
        self.settings = settings
        self.minimal = MinimalBuilder(settings, busybox=busybox, agent=agent)
        self.packages = packages
        self.apt_dir = apt_dir

    def _tarball_key(self, mirrors: list[str]) -> str:
        spec = "\n".join([SUITE, VARIANT, ",".join(sorted(self.packages)), *mirrors])
        return hashlib.sha256(spec.encode()).hexdigest()[:20]

    def inputs(self) -> dict[str, str]:
        mirrors = apt_mirrors(self.apt_dir)
        return {
            **self.minimal.inputs(),
            "builder": f"debian/{self.version}",
            "rootfs": self._tarball_key(mirrors),
            "unit": hashlib.sha256(AGENT_UNIT.encode()).hexdigest(),
            "disk_size": DISK_SIZE,
        }

    def build(self, workdir: Path, progress: Progress) -> BuildResult:
        if os.geteuid() != 0:
            raise HostUnsupported(
                "building the debian image needs root (mmdebstrap, device nodes)",
                hint="run the build as root (vzd runs as root)",
            )
        kernel = find_kernel(self.settings)
        tarball = self._rootfs_tarball(progress)

        progress("unpacking the root file system", None)
        root = workdir / "root"
        root.mkdir()
        _run(
            ["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(root)],
            "unpacking the rootfs tarball",
            f"delete {tarball} and build again",
        )
        progress("installing the agent and kernel modules", None)
        self._customize(root, kernel.release, kernel.modules)

        progress("making the ext4 file system", None)
        raw = workdir / "rootfs.raw"
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", "vzroot", "-d", str(root), str(raw), DISK_SIZE],
            "mkfs.ext4",
            "install e2fsprogs >= 1.43 (scripts/setup does this)",
        )
        shutil.rmtree(root)
        qcow2 = workdir / "rootfs.qcow2"
        self._convert(raw, qcow2, progress)
        raw.unlink()

        progress("copying the guest kernel", None)
        shutil.copyfile(kernel.path, workdir / "kernel")
        progress("building the initramfs", None)
        build_initramfs(
            workdir / "initrd",
            kernel=kernel,
            busybox=self.minimal.busybox,
            agent=self.minimal.agent(),
            init=None,
            compression=DEFAULT_COMPRESSION,
        )
        return BuildResult(
            files={"kernel": workdir / "kernel", "initrd": workdir / "initrd", "rootfs": qcow2},
            kernel_release=kernel.release,
            cmdline=f"vz.root={ROOT_DEVICE}",
        )

    def _rootfs_tarball(self, progress: Progress) -> Path:
        mirrors = apt_mirrors(self.apt_dir)
        cache = self.settings.cache_dir / "debian"
        tarball = cache / f"rootfs-{self._tarball_key(mirrors)}.tar"
        if tarball.exists():
            progress("using the cached Debian root file system", None)
            return tarball
        if shutil.which("mmdebstrap") is None:
            raise HostUnsupported(
                "mmdebstrap not found", hint="install mmdebstrap (scripts/setup does this)"
            )
        cache.mkdir(parents=True, exist_ok=True)
        # Builds of 'debian' are serialized by the store, so these are from a killed build.
        for stale in cache.glob(".mmdebstrap-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".mmdebstrap-") as tmp:
            out = Path(tmp) / "rootfs.tar"
            argv = [
                "mmdebstrap",
                f"--variant={VARIANT}",
                f"--include={','.join(self.packages)}",
                SUITE,
                str(out),
                *mirrors,
            ]
            progress("mmdebstrap: starting", 0.0)
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            assert proc.stderr is not None
            tail: list[str] = []
            for line in proc.stderr:
                line = line.rstrip()
                tail = [*tail[-40:], line]
                for prefix, fraction in _MMDEBSTRAP_PHASES:
                    if line.startswith(prefix):
                        progress(f"mmdebstrap: {line[3:]}", fraction)
                        break
            if proc.wait() != 0:
                raise ImageError(
                    "mmdebstrap failed: " + "\n".join(tail)[-2000:],
                    hint="check that the Debian mirror in /etc/apt/sources.list is reachable",
                )
            os.replace(out, tarball)
        return tarball

    def _customize(self, root: Path, release: str, modules: Path) -> None:
        agent = root / "usr" / "sbin" / "vz-agent"
        shutil.copyfile(self.minimal.agent(), agent)
        agent.chmod(0o755)
        unit_dir = root / "usr" / "lib" / "systemd" / "system"
        (unit_dir / "vz-agent.service").write_text(AGENT_UNIT)
        etc_sd = root / "etc" / "systemd" / "system"
        _enable(
            etc_sd / "sysinit.target.wants",
            "vz-agent.service",
            "/lib/systemd/system/vz-agent.service",
        )
        _enable(
            etc_sd / "getty.target.wants",
            "serial-getty@ttyS0.service",
            "/lib/systemd/system/serial-getty@.service",
        )
        (root / "etc" / "fstab").write_text(FSTAB)
        # Without /etc/hostname systemd keeps the name the initramfs set from vz.hostname=
        # (systemd.hostname= on the command line still wins).
        (root / "etc" / "hostname").unlink(missing_ok=True)
        _lock_root(root / "etc" / "shadow")
        # The whole module tree for the guest kernel, not only the virtio set: the disk image
        # is a general-purpose system (nftables, bridges, overlayfs, virtiofs load on demand)
        # and the guest has no other source of modules for this kernel. It is ~90 MB in a
        # sparse 2 GiB disk.
        dst = root / "lib" / "modules" / release
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(
            modules, dst, symlinks=True, ignore=shutil.ignore_patterns("build", "source")
        )
        run_depmod(root, release)

    def _convert(self, raw: Path, qcow2: Path, progress: Progress) -> None:
        progress("converting to qcow2", 0.0)
        proc = subprocess.Popen(
            ["qemu-img", "convert", "-p", "-O", "qcow2", str(raw), str(qcow2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        buf = b""
        last = -1.0
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-200:]
            found = re.findall(rb"\((\d+(?:\.\d+)?)/100%\)", buf)
            if found:
                fraction = float(found[-1]) / 100
                if fraction - last >= 0.05:
                    last = fraction
                    progress("converting to qcow2", fraction)
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise ImageError(
                f"qemu-img convert failed: {err.strip()[-2000:]}",
                hint="install qemu-utils (scripts/setup does this)",
            )


def _enable(wants: Path, name: str, target: str) -> None:
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / name
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _lock_root(shadow: Path) -> None:
    lines = shadow.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1 and not fields[1].startswith("!"):
            fields[1] = "!" + fields[1]
            lines[i] = ":".join(fields)
    shadow.write_text("\n".join(lines) + "\n")
