"""vzkit.api.bounds: the name rule and size parsing shared by the models and the CLI."""

from __future__ import annotations

import pytest

from vzkit.api.bounds import MAX_SIZE, NAME_RE, parse_size


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
    assert parse_size("8388607TiB") < MAX_SIZE


@pytest.mark.parametrize(
    "text",
    [
        "1" + "0" * 400,  # a float overflow (inf): an OverflowError, so a 500 from the API
        "8388608TiB",  # 2**63: past a 64-bit size
        "\u0661\u0662GiB",  # Arabic-Indic digits, which float() would take
        "12 GiB!",
    ],
)
def test_parse_size_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
