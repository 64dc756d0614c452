"""ImageStore: manifests, content addressing, sharing, rebuild decisions and integrity checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from vzkit.api.instances import ImageInfo
from vzkit.errors import Conflict, ImageError, InvalidConfig, NotFound
from vzkit.images.store import BuilderFactory, BuildResult, ImageStore, Progress
from vzkit.settings import Settings


def fake_kernel(path: Path, payload: bytes = b"kernel") -> Path:
    data = bytearray(0x300)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data) + payload)
    return path


class FakeBuilder:
    """Copies a fake kernel and busybox; 'busybox' content changes the inputs."""

    kind = "initramfs"

    def __init__(self, host: Path, *, extra: str = "", fail: bool = False) -> None:
        self.host = host
        self.extra = extra
        self.fail = fail
        self.builds = 0

    def inputs(self) -> dict[str, str]:
        return {
            "kernel": (self.host / "vmlinuz").read_bytes().hex(),
            "busybox": (self.host / "busybox").read_bytes().hex(),
            "extra": self.extra,
        }

    def build(self, workdir: Path, progress: Progress) -> BuildResult:
        self.builds += 1
        progress("building", 0.5)
        shutil.copyfile(self.host / "vmlinuz", workdir / "kernel")
        (workdir / "initrd").write_bytes(
            b"070701" + (self.host / "busybox").read_bytes() + self.extra.encode()
        )
        if self.fail:
            raise RuntimeError("builder crashed")
        return BuildResult(
            files={"kernel": workdir / "kernel", "initrd": workdir / "initrd"},
            kernel_release="6.1.0-test",
            cmdline="vz.test=1" if self.extra else "",
        )


@pytest.fixture
def host(tmp_path: Path) -> Path:
    d = tmp_path / "host"
    d.mkdir()
    fake_kernel(d / "vmlinuz")
    (d / "busybox").write_bytes(b"busybox-1")
    return d


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")


def make_store(settings: Settings, **builders: FakeBuilder) -> ImageStore:
    def factory(builder: FakeBuilder) -> BuilderFactory:
        return lambda _settings: builder

    factories = {name: factory(b) for name, b in builders.items()}
    return ImageStore(settings, factories)


def blobs(settings: Settings) -> set[str]:
    d = settings.images_dir / "blobs"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def test_build_writes_manifest_and_content_addressed_blobs(settings: Settings, host: Path) -> None:
    steps: list[tuple[str, float | None]] = []
    store = make_store(settings, minimal=FakeBuilder(host))
    info = store.build("minimal", lambda s, f: steps.append((s, f)))
    assert info.name == "minimal" and info.kind == "initramfs"
    assert info.kernel_release == "6.1.0-test"
    assert info.digest.startswith("sha256:")
    assert set(info.files) == {"kernel", "initrd"}
    kernel = Path(info.files["kernel"])
    assert kernel.parent == settings.images_dir / "blobs"
    import hashlib

    assert kernel.name == "sha256-" + hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert info.size == sum(Path(p).stat().st_size for p in info.files.values())
    raw = json.loads((settings.images_dir / "minimal.json").read_text())
    assert raw["files"]["kernel"].startswith("blobs/sha256-")
    assert ("building", 0.5) in steps
    assert store.get("minimal") == info
    assert store.list() == [info]
    store.check(info, full=True)


def test_build_skips_when_inputs_unchanged(settings: Settings, host: Path) -> None:
    builder = FakeBuilder(host)
    store = make_store(settings, minimal=builder)
    first = store.build("minimal")
    again = store.build("minimal")
    assert builder.builds == 1 and again == first
    store.build("minimal", force=True)
    assert builder.builds == 2
    (host / "busybox").write_bytes(b"busybox-2")
    changed = store.build("minimal")
    assert builder.builds == 3 and changed.digest != first.digest
    # The old initrd blob is unreferenced now and collected; the kernel is unchanged.
    assert Path(first.files["kernel"]).exists()
    assert not Path(first.files["initrd"]).exists()


def test_build_repairs_a_damaged_image_even_with_same_inputs(
    settings: Settings, host: Path
) -> None:
    builder = FakeBuilder(host)
    store = make_store(settings, minimal=builder)
    info = store.build("minimal")
    Path(info.files["initrd"]).unlink()
    store.build("minimal")
    assert builder.builds == 2
    store.check(store.get("minimal"))


def test_images_share_blobs_and_delete_keeps_shared(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host), other=FakeBuilder(host, extra="x"))
    a = store.build("minimal")
    b = store.build("other")
    assert a.files["kernel"] == b.files["kernel"]
    assert a.files["initrd"] != b.files["initrd"]
    assert b.files["cmdline"] == "vz.test=1"
    assert len(blobs(settings)) == 3
    store.delete("other")
    assert Path(a.files["kernel"]).exists()
    assert not Path(b.files["initrd"]).exists()
    store.check(a, full=True)
    store.delete("minimal")
    assert blobs(settings) == set()
    assert store.list() == []


def test_failed_build_leaves_nothing(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host, fail=True))
    with pytest.raises(RuntimeError):
        store.build("minimal")
    assert blobs(settings) == set()
    leftovers = [p.name for p in settings.images_dir.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == ["blobs"]
    with pytest.raises(NotFound):
        store.get("minimal")


def test_leftovers_of_a_killed_build_are_cleaned(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    (settings.images_dir / "blobs").mkdir(parents=True)
    stale = settings.images_dir / ".tmp-minimal-abc123"
    stale.mkdir()
    (stale / "initrd").write_bytes(b"partial")
    orphan = settings.images_dir / "blobs" / ("sha256-" + "0" * 64)
    orphan.write_bytes(b"moved in, manifest never written")
    store.build("minimal")
    assert not stale.exists()
    assert not orphan.exists()


def test_unknown_and_unbuilt_names(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    assert store.known_names() == ["minimal"]
    with pytest.raises(NotFound) as unknown:
        store.get("nope")
    assert unknown.value.hint == "vz image list / vz image build NAME"
    with pytest.raises(NotFound) as unbuilt:
        store.get("minimal")
    assert unbuilt.value.hint is not None and "vz image build minimal" in unbuilt.value.hint
    with pytest.raises(NotFound):
        store.get("../etc/passwd")
    with pytest.raises(NotFound):
        store.delete("nope")
    with pytest.raises(NotFound):
        store.build("nope")
    with pytest.raises(NotFound):
        store.ensure("nope")


def test_ensure_builds_once(settings: Settings, host: Path) -> None:
    builder = FakeBuilder(host)
    store = make_store(settings, minimal=builder)
    info = store.ensure("minimal")
    assert store.ensure("minimal") == info
    assert builder.builds == 1


@pytest.mark.parametrize(
    ("role", "damage", "what"),
    [
        ("kernel", "truncate", "bytes, expected"),
        ("initrd", "truncate", "bytes, expected"),
        ("kernel", "header", "wrong header"),
        ("initrd", "header", "wrong header"),
        ("kernel", "remove", "is missing"),
    ],
)
def test_check_catches_damage(
    settings: Settings, host: Path, role: str, damage: str, what: str
) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    info = store.build("minimal")
    path = Path(info.files[role])
    path.chmod(0o644)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-1])
    elif damage == "header":
        path.write_bytes(b"\0" * len(data))
    else:
        path.unlink()
    with pytest.raises(ImageError) as err:
        store.check(info)
    assert err.value.message.startswith("image 'minimal' is corrupt: ")
    assert what in err.value.message
    assert err.value.hint == "rebuild it: vz image build minimal --force"


def test_full_check_catches_same_size_corruption(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    info = store.build("minimal")
    path = Path(info.files["kernel"])
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    store.check(info)  # size and header still fine
    with pytest.raises(ImageError, match="checksum"):
        store.check(info, full=True)


def test_check_rejects_a_stale_info(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    old = store.build("minimal")
    store.delete("minimal")
    with pytest.raises(ImageError, match="corrupt"):
        store.check(old)


def test_corrupt_manifest_is_an_image_error(settings: Settings, host: Path) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    store.build("minimal")
    (settings.images_dir / "minimal.json").write_text("{not json")
    with pytest.raises(ImageError, match="unreadable manifest"):
        store.get("minimal")


def test_corrupt_manifest_is_skipped_by_list_and_replaced_by_build(
    settings: Settings, host: Path
) -> None:
    store = make_store(settings, minimal=FakeBuilder(host))
    store.build("minimal")
    (settings.images_dir / "minimal.json").write_text("{not json")
    assert store.list() == []
    info = store.build("minimal")
    store.check(info, full=True)


def test_concurrent_builds_of_one_image_are_serialized(settings: Settings, host: Path) -> None:
    import threading

    builder = FakeBuilder(host)
    store = make_store(settings, minimal=builder)
    results: list[ImageInfo] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(store.build("minimal"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a build never returned"
    # Every caller gets the one image: none fails, none builds it again.
    assert errors == [] and len(results) == 4
    assert builder.builds == 1
    assert len({r.digest for r in results}) == 1
    store.check(results[0], full=True)


def _bytes_read(call: Callable[[], object]) -> int:
    """Bytes this thread read through read(2) and friends while ``call`` ran."""

    def rchar() -> int:
        for line in Path("/proc/thread-self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "rchar":
                return int(value)
        raise AssertionError("no rchar in /proc/thread-self/io")

    before = rchar()
    call()
    return rchar() - before


def test_cheap_check_reads_headers_not_contents(settings: Settings, host: Path) -> None:
    """The check run at every launch costs the same whatever an image's size: it stats the
    files and reads their magic bytes, never their contents (benchmarks/latencies.py times
    it against the full check)."""
    size = 4 * 1024 * 1024
    fake_kernel(host / "vmlinuz", b"k" * size)
    store = make_store(settings, minimal=FakeBuilder(host))
    info = store.build("minimal")
    full = _bytes_read(lambda: store.check(info, full=True))
    assert full >= size  # the measure sees a whole-file read
    cheap = _bytes_read(lambda: store.check(info))
    assert cheap < 64 * 1024, f"the cheap check read {cheap} bytes"


def test_check_new_name(settings: Settings, host: Path) -> None:
    """What publish checks before it flattens a disk (and the API before its stream)."""
    store = make_store(settings, minimal=FakeBuilder(host))
    store.check_new_name("mine")
    with pytest.raises(InvalidConfig, match="invalid image name"):
        store.check_new_name("Mine\n")
    with pytest.raises(Conflict, match="built-in"):
        store.check_new_name("minimal")
    store.build("minimal")
    base = store.get("minimal")
    disk = settings.state_dir / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(508))
    store.publish("mine", base, disk, "web")
    with pytest.raises(Conflict, match="already exists"):
        store.check_new_name("mine")
