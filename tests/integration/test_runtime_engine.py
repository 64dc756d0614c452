"""ContainerEngine driving vz-runtime through its command line, seen through the daemon:
system containers get the device rules, and files are pushed and pulled by the runtime's
file helper, never by the image's own binaries, inside the container's own root."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.api.instances import InstanceCreate
from vzkit.errors import InvalidConfig, VzError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

CAP_MKNOD = 27


@pytest.fixture
def box(client: Client) -> Iterator[str]:
    client.create_instance(
        InstanceCreate.model_validate(
            {"name": "rtbox", "type": "container", "limits": {"memory": "64MiB"}}
        )
    )
    yield "rtbox"
    client.delete_instance("rtbox", force=True)


def sh(client: Client, name: str, script: str) -> tuple[int, str]:
    res, out, err = client.exec_capture(name, ["sh", "-c", script])
    return res.exit_code, (out + err).decode()


def test_system_container_cannot_make_or_open_host_devices(client: Client, box: str) -> None:
    """Before, ContainerEngine replaced linux.resources and dropped the device rules: a
    system container (it has CAP_MKNOD) made /dev/kvm and a block device and opened them."""
    cap_eff = int(sh(client, box, "grep CapEff /proc/self/status")[1].split()[1], 16)
    assert cap_eff & (1 << CAP_MKNOD), "the test needs a container with CAP_MKNOD"
    for node in ("c 10 232", "b 7 0", "b 8 0"):
        code, out = sh(client, box, f"mknod /tmp/node {node} && : < /tmp/node")
        assert code != 0 and "Operation not permitted" in out, (node, out)
        sh(client, box, "rm -f /tmp/node")
    for ok in (": < /dev/null", "head -c 4 /dev/zero | wc -c", ": < /dev/urandom"):
        code, out = sh(client, box, ok)
        assert code == 0, (ok, out)


def _remove_shells(client: Client, name: str) -> None:
    dirs = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin")
    client.exec_capture(name, ["rm", "-f", *(f"{d}/{s}" for d in dirs for s in ("sh", "ash"))])
    res, _, _ = client.exec_capture(name, ["sh", "-c", "true"])
    assert res.exit_code != 0, "the container still has a shell"


def test_push_and_pull_without_a_shell(client: Client, box: str) -> None:
    """Before, push ran `sh -c 'cat ... mv'` and pull ran `stat` and `cat` in the container:
    in a container without a shell, push failed."""
    _remove_shells(client, box)
    data = os.urandom(300_000)
    client.push_file(box, "/root/new/blob", io.BytesIO(data), mode=0o640, parents=True)
    mode, chunks = client.pull_file(box, "/root/new/blob")
    assert mode & 0o7777 == 0o640 and b"".join(chunks) == data
    client.push_file(box, "/root/new/blob", io.BytesIO(b"again"), mode=0o600)
    mode, chunks = client.pull_file(box, "/root/new/blob")
    assert mode & 0o7777 == 0o600 and b"".join(chunks) == b"again"
    _, out, _ = client.exec_capture(box, ["ls", "-a", "/root/new"])
    assert out.split() == [b".", b"..", b"blob"], "no temporary file is left"
    with pytest.raises(VzError, match="does not exist"):
        client.pull_file(box, "/root/missing")
    with pytest.raises(VzError, match="does not exist"):
        client.push_file(box, "/nowhere/x", io.BytesIO(b"x"))


def test_setuid_files_are_refused(client: Client, box: str) -> None:
    with pytest.raises(InvalidConfig, match="setuid or setgid"):
        client.push_file(box, "/root/suid", io.BytesIO(b"x"), mode=0o4755)
    with pytest.raises(VzError):
        client.pull_file(box, "/root/suid")


def test_symlinks_resolve_inside_the_container(client: Client, box: str, tmp_path: Path) -> None:
    """A link the container made to a host path (absolute, or by enough ../) leads to that
    path inside the container's root, never to the host's."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host data")
    up = "../" * 12 + str(host).lstrip("/")
    script = f"mkdir -p /data && ln -s {host} /data/abs && ln -s {up} /data/up"
    assert sh(client, box, script)[0] == 0
    for link in ("/data/abs", "/data/up"):
        with pytest.raises(VzError, match="does not exist"):
            client.pull_file(box, f"{link}/secret")
        client.push_file(box, f"{link}/planted", io.BytesIO(link.encode()), parents=True)
    assert sorted(p.name for p in host.iterdir()) == ["secret"], "nothing written on the host"
    _, out, _ = client.exec_capture(box, ["cat", f"{host}/planted"])
    assert out == b"/data/up"  # both links led to the same place in the container
