"""`vz run minimal -- true` against a raw QEMU boot of the same kernel and initramfs.

The peer is the floor: qemu-system-x86_64 started by hand with the same machine type,
accelerator, CPUs, memory and kernel command line, booting an initramfs with the same
kernel modules and busybox whose /init powers off at once. The ratio is vz's median wall
time over the peer's; the target is <= 1.15 on TCG.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import VZ, median, private_daemon, timed
from vzkit.engines.qemu.cmdline import kernel_cmdline
from vzkit.host.probe import probe_host
from vzkit.images.initramfs import build_poweroff_initramfs
from vzkit.settings import Settings


def raw_qemu_argv(
    settings: Settings, kernel: str, initrd: Path, cmdline: str, accel: str
) -> list[str]:
    accel_args = (
        ["-accel", "kvm", "-cpu", "host"]
        if accel == "kvm"
        else ["-accel", "tcg,tb-size=64", "-cpu", "max"]
    )
    return [
        settings.qemu_binary,
        "-machine",
        "microvm",
        *accel_args,
        "-smp",
        "1",
        "-m",
        "256M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "null",
        "-kernel",
        kernel,
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=7)
    args = parser.parse_args()
    with private_daemon() as (env, client):
        settings = Settings()
        host = probe_host(settings)
        image = client.build_image("minimal")
        with tempfile.TemporaryDirectory() as tmp:
            baseline = build_poweroff_initramfs(settings, Path(tmp) / "poweroff.img")
            cmdline = kernel_cmdline(hostname="bench", tsc_khz=host.tsc_khz)
            raw = raw_qemu_argv(settings, image.files["kernel"], baseline, cmdline, host.accel)
            vz = [*VZ, "run", "--cpus", "1", "--memory", "256MiB", "minimal", "--", "true"]
            # Warm both paths once (page cache, daemon imports) before measuring.
            subprocess.run(raw, check=True, timeout=120)
            subprocess.run(vz, env=env, check=True, timeout=120)
            raw_t: list[float] = []
            vz_t: list[float] = []
            for _ in range(args.runs):
                # Interleaved, so drift in machine load hits both sides alike.
                raw_t.append(timed(lambda: subprocess.run(raw, check=True, timeout=120)))
                vz_t.append(timed(lambda: subprocess.run(vz, env=env, check=True, timeout=120)))
    r, v = median(raw_t), median(vz_t)
    print(f"accelerator: {host.accel} ({host.accel_reason})")
    print(f"raw qemu boot+poweroff  median {r:.3f}s  runs {[round(x, 3) for x in raw_t]}")
    print(f"vz run minimal -- true  median {v:.3f}s  runs {[round(x, 3) for x in vz_t]}")
    print(f"ratio vz/raw: {v / r:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
