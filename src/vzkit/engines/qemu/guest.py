"""Scripts the QEMU engine has the guest agent run: disk links, zeroed free memory, and
the runner that turns a failed script into a clear error."""

from __future__ import annotations

import shlex

from vzkit.engines.qemu.agent import AgentClient
from vzkit.errors import EngineError

NET_HINT = "the image needs a POSIX sh and the ip command (busybox or iproute2)"


def disk_links(serials: list[str]) -> str:
    """Wait for the disks with these serials and link /dev/disk/by-id/virtio-SERIAL to them,
    as udev does where there is one (so the path is the same in every image)."""
    wanted = " ".join(shlex.quote(s) for s in serials)
    return f"""
modprobe virtio_blk 2>/dev/null
mkdir -p /dev/disk/by-id
for want in {wanted}; do
  found=
  for i in $(seq 100); do
    for f in /sys/block/*/serial; do
      [ "$(cat "$f" 2>/dev/null)" = "$want" ] && found=${{f%/serial}} && break 2
    done
    sleep 0.1
  done
  [ -n "$found" ] || {{ echo "disk $want did not appear" >&2; exit 1; }}
  ln -sf "../../${{found##*/}}" "/dev/disk/by-id/virtio-$want"
done
"""


# A tmpfs file of zeros as large as free memory allows (keeping 24 MiB spare so nothing
# else in the guest runs short), then removed: the freed pages hold zeros.
ZERO_FREE_MEMORY = """
sync; echo 3 > /proc/sys/vm/drop_caches
d=$(mktemp -d) && mount -t tmpfs -o size=100% vz-zero "$d" || exit 0
free=$(awk '/^MemAvailable:/ {print int($2 / 1024) - 24}' /proc/meminfo)
[ "$free" -gt 0 ] && dd if=/dev/zero of="$d/zero" bs=1M count="$free" 2>/dev/null
umount "$d"; rmdir "$d"
"""


async def configure(
    agent: AgentClient, script: str, what: str = "network", hint: str = NET_HINT
) -> None:
    """Run a set-up script in the guest through its agent (NIC addresses: no DHCP round
    trip on the boot path; disks: driver and /dev/disk/by-id links)."""
    done = await agent.run(["/bin/sh", "-c", script], timeout=30)
    if done.result.exit_code != 0:
        why = (done.stderr or done.stdout).decode(errors="replace").strip()[-500:]
        raise EngineError(f"configuring the guest's {what} failed: {why or done.result}", hint=hint)
