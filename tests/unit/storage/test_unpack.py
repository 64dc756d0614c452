"""The import unpacker's caps, sparse members and refusals, fed archives made here."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from vzkit.host import safefs
from vzkit.storage.unpack import HEADER, Refused, Unpacker, main

OWNED = ("instance/upper", "instance/snapshots/*/upper")


def _unpack(archive: bytes, dest: Path, cap: int = 1 << 30) -> None:
    fd = safefs.open_dir(dest)
    try:
        Unpacker(fd, OWNED, cap, cap).run(io.BytesIO(archive))
    finally:
        os.close(fd)


def _tar(*members: tuple[str, bytes, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in members:
            m = tarfile.TarInfo(name)
            m.type, m.size = kind, len(data or b"")
            m.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_sizes_are_capped_per_member_and_in_all(tmp_path: Path) -> None:
    big = _tar((HEADER, tarfile.REGTYPE, b"{}"), ("instance", tarfile.DIRTYPE, None),
               ("instance/a.qcow2", tarfile.REGTYPE, b"x" * 600),
               ("instance/b.qcow2", tarfile.REGTYPE, b"x" * 600))  # fmt: skip
    (tmp_path / "one").mkdir()
    with pytest.raises(Refused, match="larger than 500 bytes"):
        _unpack(big, tmp_path / "one", cap=500)
    (tmp_path / "two").mkdir()
    fd = safefs.open_dir(tmp_path / "two")
    try:
        with pytest.raises(Refused, match="unpacks to more than 1000 bytes"):
            Unpacker(fd, OWNED, 1000, 1000).run(io.BytesIO(big))
    finally:
        os.close(fd)


def test_a_sparse_member_stays_sparse(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "instance").mkdir(parents=True)
    (src / HEADER).write_text("{}")
    with (src / "instance" / "disk.qcow2").open("wb") as f:
        f.seek(512 << 20)
        f.write(b"end")
    archive = subprocess.run(["tar", "-C", str(src), "--sparse", "-cf", "-", HEADER, "instance"],
                             check=True, capture_output=True).stdout  # fmt: skip
    assert len(archive) < 1 << 20
    (tmp_path / "out").mkdir()
    _unpack(archive, tmp_path / "out")
    disk = tmp_path / "out" / "instance" / "disk.qcow2"
    assert disk.stat().st_size == (512 << 20) + 3
    assert disk.stat().st_blocks * 512 < 1 << 20
    with disk.open("rb") as f:
        f.seek(512 << 20)
        assert f.read() == b"end"


def test_a_refusal_is_one_line_of_json_and_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _tar(("elsewhere/x", tarfile.REGTYPE, b"x"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(archive)))
    monkeypatch.setattr("resource.setrlimit", lambda *a: None)  # not this test process's
    status = main(["--dest", str(tmp_path), "--max-member", "10", "--max-total", "10"])
    assert status == 2
    assert "unexpected archive member 'elsewhere/x'" in capsys.readouterr().err
