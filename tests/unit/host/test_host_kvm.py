"""The KVM verdict: module names, device access, and the ring-0 rate (ioctl part injected)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzkit.host.kvm import MIN_RING0_MIPS, Ring0Result, classify, probe_kvm, vendor_modules


def modules(tmp_path: Path, *names: str) -> Path:
    sys_module = tmp_path / "module"
    for name in ("kvm", *names):
        (sys_module / name / "parameters").mkdir(parents=True)
    return sys_module


def device(tmp_path: Path) -> str:
    dev = tmp_path / "kvm"
    dev.write_text("")
    return str(dev)


def test_vendor_modules(tmp_path: Path) -> None:
    assert vendor_modules(modules(tmp_path, "kvm_intel")) == ["kvm_intel"]
    assert vendor_modules(tmp_path / "none") == []


def test_vendor_modules_unknown_kvm_module(tmp_path: Path) -> None:
    assert vendor_modules(modules(tmp_path, "kvm_pvm", "kvm_foo")) == ["kvm_pvm", "kvm_foo"]


def test_pvm_is_unusable(tmp_path: Path) -> None:
    status = probe_kvm(
        device(tmp_path),
        sys_module=modules(tmp_path, "kvm_pvm"),
        measure=lambda _dev: Ring0Result(3.1, None, 2599998),
    )
    assert not status.usable
    assert status.module == "kvm_pvm"
    assert status.ring0_mips == pytest.approx(3.1)
    assert status.reason == (
        "KVM (kvm_pvm) emulates guest ring-0 code at 3.1 MIPS; "
        "a standard kernel cannot boot under it: using TCG"
    )
    assert status.tsc_khz == 2599998


def test_hardware_kvm_is_usable(tmp_path: Path) -> None:
    status = probe_kvm(
        device(tmp_path),
        sys_module=modules(tmp_path, "kvm_intel"),
        measure=lambda _dev: Ring0Result(1800.0),
    )
    assert status.usable
    assert status.module == "kvm_intel"
    assert "1800 MIPS" in status.reason


def test_threshold() -> None:
    assert not classify("kvm_amd", Ring0Result(MIN_RING0_MIPS - 1)).usable
    assert classify("kvm_amd", Ring0Result(MIN_RING0_MIPS)).usable


def test_guest_failure_is_unusable() -> None:
    status = classify(
        "kvm_pvm", Ring0Result(None, "the test guest stopped with KVM_EXIT_INTERNAL_ERROR")
    )
    assert not status.usable
    assert "KVM_EXIT_INTERNAL_ERROR" in status.reason
    assert status.reason.endswith("using TCG")


def test_missing_device(tmp_path: Path) -> None:
    status = probe_kvm(str(tmp_path / "nope"), sys_module=tmp_path / "none")
    assert not status.usable
    assert status.module is None
    assert "does not exist" in status.reason


def test_no_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.access", lambda *_a, **_k: False)
    status = probe_kvm(device(tmp_path), sys_module=modules(tmp_path, "kvm_amd"))
    assert not status.usable
    assert "access" in status.reason


def test_open_failure(tmp_path: Path) -> None:
    def fail(_dev: str) -> Ring0Result:
        raise PermissionError(13, "Permission denied")

    status = probe_kvm(device(tmp_path), sys_module=modules(tmp_path), measure=fail)
    assert not status.usable
    assert "Permission denied" in status.reason
