"""vzkit.api.bounds: the name rule and size parsing shared by the models and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vzkit.api.bounds import (
    MAX_CPUS,
    MAX_SIZE,
    MIN_ANY_MEMORY,
    MIN_MEMORY,
    NAME_RE,
    MiB,
    OutOfBounds,
    PiB,
    check_cpu_weight,
    check_cpus,
    check_memory,
    parse_file_mode,
    parse_size,
)


@pytest.mark.parametrize("name", ["web", "a", "web-1", "0" * 63])
def test_names_accepted(name: str) -> None:
    assert NAME_RE.match(name)


@pytest.mark.parametrize("name", ["web\n", "web\n\n", "\nweb", "Web", "-web", "0" * 64, ""])
def test_names_rejected(name: str) -> None:
    # "web\n" passed while the rule ended in $, which also matches before a final newline.
    assert not NAME_RE.match(name)


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size(" 1.5 g ") == 1536 * 1024**2
    assert parse_size("1GiB", default_unit="mib") == 1024**3
    assert parse_size("512", default_unit="mib") == 512 * 1024**2
    assert parse_size("1023TiB") < MAX_SIZE


@pytest.mark.parametrize(
    "text",
    [
        "1" + "0" * 400,  # a float overflow (inf): an OverflowError, so a 500 from the API
        "8388608TiB",  # 2**63: past a 64-bit size, and past 1 PiB
        "1" * 5000,  # past int()'s own digit limit (a ValueError of its own, a traceback)
        "\u0661\u0662GiB",  # Arabic-Indic digits, which float() would take
        "12 GiB!",
    ],
)
def test_parse_size_rejected(text: str) -> None:
    with pytest.raises(OutOfBounds, match="invalid size"):
        parse_size(text)


# -- issue 11: one set of bounds for the CLI, the API and the SDK ------------------------------


def test_binary_units_up_to_pib() -> None:
    assert parse_size("1PiB") == PiB == MAX_SIZE
    assert parse_size("1024TiB") == PiB
    assert parse_size("1p") == PiB
    assert parse_size("1PB") == 1000**5
    assert parse_size("0.5PiB") == PiB // 2


@pytest.mark.parametrize("text", ["2PiB", "1.5PiB", "1025TiB", "1048577GiB", str(PiB + 1)])
def test_sizes_past_the_documented_maximum_are_refused(text: str) -> None:
    with pytest.raises(OutOfBounds, match="at most 1PiB") as info:
        parse_size(text)
    assert info.value.hint and "1PiB" in info.value.hint


@pytest.mark.parametrize("value", [True, False, -1, PiB + 1])
def test_odd_python_values_are_no_sizes(value: int) -> None:
    with pytest.raises(OutOfBounds):
        parse_size(value)


def test_memory_floor_per_type() -> None:
    for type, least in MIN_MEMORY.items():
        assert check_memory(least, type) == least
        with pytest.raises(OutOfBounds, match=f"too small for a {type}"):
            check_memory(least - MiB, type)
    # A VM's kernel does not even unpack in a container's floor.
    assert MIN_MEMORY["microvm"] > MIN_MEMORY["container"]
    assert check_memory(MIN_ANY_MEMORY) == MIN_ANY_MEMORY
    with pytest.raises(OutOfBounds, match="too small for an instance"):
        check_memory(MiB)
    with pytest.raises(OutOfBounds, match="too large"):
        check_memory(PiB + 1)


@pytest.mark.parametrize(
    ("text", "mode"),
    [("0644", 0o644), ("755", 0o755), ("0o600", 0o600), ("1777", 0o1777), ("0", 0)],
)
def test_file_modes(text: str, mode: int) -> None:
    assert parse_file_mode(text) == mode


@pytest.mark.parametrize(
    "text", ["999", "17777", "", "+644", " 644", "0x1ff", "\uff16\uff14\uff14"]
)
def test_file_modes_rejected(text: str) -> None:
    with pytest.raises(OutOfBounds, match="invalid file mode"):
        parse_file_mode(text)


@pytest.mark.parametrize("text", ["4755", "2755", "6755", "04755"])
def test_setid_modes_only_when_asked_for(text: str) -> None:
    with pytest.raises(OutOfBounds, match="setuid or setgid") as info:
        parse_file_mode(text)
    assert info.value.hint and "allow_setid=true" in info.value.hint
    assert parse_file_mode(text, allow_setid=True) == int(text, 8)


def test_cpus_and_weight() -> None:
    assert check_cpus(MAX_CPUS) == MAX_CPUS
    assert check_cpu_weight(10000) == 10000
    for bad in (0, MAX_CPUS + 1):
        with pytest.raises(OutOfBounds, match="out of range"):
            check_cpus(bad)
    with pytest.raises(OutOfBounds, match="out of range"):
        check_cpu_weight(0)


def test_bounds_import_no_pydantic() -> None:
    code = "import sys, vzkit.api.bounds; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
