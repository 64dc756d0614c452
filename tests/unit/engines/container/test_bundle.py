"""The OCI config the container engine writes: user namespace, no raw sockets, pids limit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import pytest

from vzkit.api.instances import Instance
from vzkit.engines.container.engine import ContainerEngine
from vzkit.engines.container.files import ContainerState
from vzkit.engines.container.idmap import IdMap
from vzkit.errors import InvalidConfig
from vzkit.images.store import ImageStore
from vzkit.settings import Settings

MAP = IdMap(uid=1000000, gid=1000000, size=1000000000)


def _config(tmp_path: Path, idmap: IdMap | None, **limits: Any) -> dict[str, Any]:
    settings = dataclasses.replace(
        Settings(), state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"
    )
    engine = ContainerEngine(settings, cast(ImageStore, None), None)
    inst = Instance.model_validate(
        {
            "name": "c1",
            "type": "container",
            "image": "minimal",
            "limits": {"memory": 64 * 2**20, **limits},
            "state": "stopped",
            "created_at": "2024-01-01T00:00:00Z",
            "security": {"privileged": idmap is None},
        }
    )
    sdir = tmp_path / "sdir"
    (sdir / "bundle").mkdir(parents=True)
    asyncio.run(engine._write_bundle(inst, sdir, tmp_path / "rootfs", idmap))
    config: dict[str, Any] = json.loads((sdir / "bundle" / "config.json").read_text())
    return config


def test_unprivileged_config(tmp_path: Path) -> None:
    config = _config(tmp_path, MAP, processes=300)
    linux = config["linux"]
    assert {"type": "user"} in linux["namespaces"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000000, "size": 1000000000}]
    assert linux["gidMappings"] == linux["uidMappings"]
    assert linux["resources"]["pids"] == {"limit": 300}
    assert linux["sysctl"]["net.ipv4.ping_group_range"] == "0 999999999"
    assert config["root"]["path"] == str(tmp_path / "rootfs")
    for caps in config["process"]["capabilities"].values():
        assert "CAP_NET_RAW" not in caps and "CAP_CHOWN" in caps
    # The runtime's device rules are kept (deny all first).
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}


@pytest.mark.parametrize("processes", [None, 4096])
def test_privileged_config(tmp_path: Path, processes: int | None) -> None:
    config = _config(tmp_path, None, **({"processes": processes} if processes else {}))
    linux = config["linux"]
    assert {"type": "user"} not in linux["namespaces"] and "uidMappings" not in linux
    assert linux["sysctl"]["net.ipv4.ping_group_range"] == "0 2147483647"
    assert linux["resources"]["pids"] == {"limit": processes or 2048}


def test_make_dirs_refuses_a_linked_upper_layer(tmp_path: Path) -> None:
    """An imported archive's instance/upper as a symlink: never followed, refused."""
    sdir, target = tmp_path / "sdir", tmp_path / "elsewhere"
    sdir.mkdir()
    target.mkdir(mode=0o755)
    (sdir / "upper").symlink_to(target)
    with pytest.raises(InvalidConfig, match="'upper' is not a directory"):
        ContainerEngine.make_dirs(sdir, ContainerState(lower="/x", idmap=None))
    assert target.stat().st_mode & 0o777 == 0o755 and list(target.iterdir()) == []
    (sdir / "upper").unlink()
    ContainerEngine.make_dirs(sdir, ContainerState(lower="/x", idmap=None))
    assert sorted(p.name for p in sdir.iterdir()) == ["bundle", "upper", "work"]
    assert sdir.stat().st_mode & 0o777 == 0o700
