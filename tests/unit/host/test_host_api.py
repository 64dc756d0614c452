"""The names vzkit.host exports are the intended ones."""

from __future__ import annotations

import vzkit.host


def test_exports() -> None:
    assert sorted(vzkit.host.__all__) == sorted(
        [
            "Cgroup",
            "CgroupDriver",
            "CgroupLimits",
            "CgroupStats",
            "CgroupV1",
            "CgroupV2",
            "HostInfo",
            "KvmStatus",
            "OvercommitPolicy",
            "check_fit",
            "detect",
            "detect_version",
            "probe_host",
            "probe_kvm",
            "qemu_memory_limit",
        ]
    )
    for name in vzkit.host.__all__:
        assert getattr(vzkit.host, name) is not None
