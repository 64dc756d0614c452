#!/bin/sh
# vzkit guest /init.sh (busybox sh): boots disk images. The agent is /init; it runs this
# script when the kernel command line has vz.root=, and sets up initramfs-only guests
# itself. The script also works as rdinit=/init.sh on its own.
#
# Boot time is the product here: every fork of busybox costs milliseconds under TCG, so
# this script keeps the number of commands low and does nothing a guest does not need.
export PATH=/sbin:/bin

# The agent (the real /init) has mounted /proc already when it hands a disk image over.
[ -e /proc/self ] || mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    # Exiting PID 1 panics the kernel and hides the reason; say it on the console and stop.
    echo "vz-init: $*" >/dev/console
    poweroff -f
}

read -r cmdline </proc/cmdline
root=
for arg in $cmdline; do
    case "$arg" in
    vz.root=*) root=${arg#vz.root=} ;;
    vz.hostname=*) hostname "${arg#vz.hostname=}" ;;
    esac
done

# microvm puts its virtio devices on virtio-mmio, a q35 VM on PCI: load the bus driver that
# has devices, then only the drivers of the virtio devices present (measured: loading
# virtio_net, virtio_blk and virtio_rng needlessly costs ~30-50 ms under TCG). One
# modprobe -a call per step keeps it to two forks; modprobe resolves dependencies.
bus=virtio_mmio
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev" ] && bus=virtio_pci
    break
done
modprobe $bus || fail "loading $bus failed"
mods=
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev/device" ] || continue
    read -r id <"$dev/device"
    case "$id" in
    0x0001) mods="$mods virtio_net" ;;
    0x0002) mods="$mods virtio_blk" ;;
    0x0003) mods="$mods virtio_console" ;;
    0x0004) mods="$mods virtio_rng" ;;
    esac
done
if [ -n "$mods" ]; then
    modprobe -a $mods || fail "loading$mods failed"
fi

if [ -n "$root" ]; then
    mkdir -p /newroot
    # The disk appears asynchronously after virtio_blk probes it; wait up to 10 s.
    i=0
    while [ ! -b "$root" ]; do
        i=$((i + 1))
        [ "$i" -gt 1000 ] && fail "root device $root did not appear"
        usleep 10000
    done
    mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"
    # systemd accepts these already mounted; moving them avoids remounting.
    mount --move /dev /newroot/dev
    mount --move /proc /newroot/proc
    mount --move /sys /newroot/sys
    exec switch_root /newroot /sbin/init
fi

mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
exec /sbin/vz-agent --port-name org.vzkit.agent
