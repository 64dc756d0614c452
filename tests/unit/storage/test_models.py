"""Storage models: sizes, names, defaults and strictness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vzkit import storage
from vzkit.api.bounds import NAME_PATTERN
from vzkit.api.storage import (
    MAX_VOLUME_SIZE,
    MIN_VOLUME_SIZE,
    PATH_MAX,
    PoolConfig,
    PoolInfo,
    VolumeAttachment,
    VolumeConfig,
    VolumeInfo,
)


def volume(**kw: Any) -> VolumeConfig:
    return VolumeConfig.model_validate({"name": "data", "size": "1GiB", **kw})


def test_volume_defaults() -> None:
    v = volume()
    assert (v.pool, v.content, v.size) == ("default", "block", 1024**3)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10GiB", 10 * 1024**3),
        ("1.5G", 1536 * 1024**2),
        ("2MB", 2_000_384),
        (1024**2, 1024**2),
        (str(3 * 1024**2), 3 * 1024**2),
        # Rounded up to whole 512-byte sectors, as qemu-img does.
        (1024**2 + 1, 1024**2 + 512),
        ("1.1GB", 1_100_000_256),
    ],
)
def test_volume_sizes(given: str | int, expected: int) -> None:
    assert volume(size=given).size == expected


@pytest.mark.parametrize("bad", ["512KiB", MIN_VOLUME_SIZE - 512, 0, -1, "ten gigs", "5XB", ""])
def test_volume_size_rejected(bad: str | int) -> None:
    with pytest.raises(ValidationError):
        volume(size=bad)


def test_volume_size_required() -> None:
    with pytest.raises(ValidationError, match="size"):
        VolumeConfig.model_validate({"name": "data"})


@pytest.mark.parametrize("name", ["Data", "-data", "data-", "a" * 64, "da_ta", "d.ta", "../x", ""])
def test_volume_name_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid volume name"):
        volume(name=name)


def test_volume_pool_name_checked() -> None:
    with pytest.raises(ValidationError, match="invalid pool name"):
        volume(pool="Fast/SSD")


def test_content_types() -> None:
    assert volume(content="filesystem").content == "filesystem"
    with pytest.raises(ValidationError):
        volume(content="raw")


@pytest.mark.parametrize("model", [VolumeConfig, PoolConfig])
def test_unknown_fields_rejected(model: type[VolumeConfig] | type[PoolConfig]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model.model_validate({"name": "x", "size": "1GiB", "sise": 1})


def test_pool_config() -> None:
    p = PoolConfig.model_validate({"name": "default"})
    assert (p.driver, p.path) == ("dir", None)
    p = PoolConfig.model_validate({"name": "fast", "path": "/srv/fast"})
    assert p.path == Path("/srv/fast")
    for bad in ({"name": "fast", "driver": "zfs"}, {"name": "Fast"}, {"name": "f", "path": "rel"}):
        with pytest.raises(ValidationError):
            PoolConfig.model_validate(bad)


def test_info_models_round_trip() -> None:
    v = VolumeInfo.model_validate(
        {"name": "data", "size": "1GiB", "path": "/p/volumes/data.qcow2", "used": 196_608}
    )
    assert v.attached_to == []
    assert VolumeInfo.model_validate(v.model_dump()) == v
    with pytest.raises(ValidationError):
        VolumeInfo.model_validate({**v.model_dump(), "used": -1})
    p = PoolInfo.model_validate({"name": "default", "total": 10, "used": 4, "free": 5})
    assert PoolInfo.model_validate_json(p.model_dump_json()) == p


def test_public_names() -> None:
    assert sorted(storage.__all__) == [
        "Content",
        "DirPool",
        "PoolConfig",
        "PoolDriver",
        "PoolInfo",
        "VolumeConfig",
        "VolumeInfo",
    ]
    for name in storage.__all__:
        assert hasattr(storage, name)


@pytest.mark.parametrize(
    "bad",
    [
        MAX_VOLUME_SIZE + 512,  # past qcow2's limit, where qemu-img fails (a 500 before)
        2**70,  # past a 64-bit size
        "1" + "0" * 400 + "GiB",  # a float overflow in parse_size (a 500 before)
        "\u0661\u0662GiB",  # Arabic-Indic digits, which float() would take
    ],
)
def test_volume_size_too_large_or_odd_rejected(bad: str | int) -> None:
    with pytest.raises(ValidationError, match="size"):
        volume(size=bad)


def test_volume_size_upper_bound_accepted() -> None:
    assert volume(size=MAX_VOLUME_SIZE).size == MAX_VOLUME_SIZE
    assert volume(size="1024TiB").size == MAX_VOLUME_SIZE


@pytest.mark.parametrize("name", ["data\n", "data\n\n"])
def test_name_with_trailing_newline_rejected(name: str) -> None:
    # Python's $ matches before a final newline: the rule is anchored with \Z.
    with pytest.raises(ValidationError, match="invalid volume name"):
        volume(name=name)
    with pytest.raises(ValidationError, match="invalid pool name"):
        PoolConfig.model_validate({"name": name})


@pytest.mark.parametrize(
    "path", ["/srv/a\x00b", "/srv/\ud800", "/srv/../etc", "/" + "a" * PATH_MAX, "/srv/a\n/.."]
)
def test_pool_path_rejected(path: str) -> None:
    with pytest.raises(ValidationError, match="pool path"):
        PoolConfig.model_validate({"name": "p", "path": path})


@pytest.mark.parametrize("path", ["/data\x00", "/" + "a" * PATH_MAX, "relative", "/", "/a/../b"])
def test_mount_path_rejected(path: str) -> None:
    with pytest.raises(ValidationError, match="invalid mount path"):
        VolumeAttachment.model_validate({"volume": "v", "path": path})


def test_schema_shows_the_name_rule() -> None:
    props = VolumeConfig.model_json_schema()["properties"]
    assert props["name"]["pattern"] == NAME_PATTERN == props["pool"]["pattern"]
    assert props["size"]["maximum"] == MAX_VOLUME_SIZE
