"""vz-runtime's pure parts: bundle validation, ids, resources, signals, state, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vzkit_runtime import control, execute
from vzkit_runtime import runtime as rt
from vzkit_runtime import spec as oci
from vzkit_runtime.cli import main
from vzkit_runtime.errors import Conflict, HostUnsupported, InvalidConfig, NotFound, StateError
from vzkit_runtime.state import State, alive, load, proc_start_time


def _bundle(tmp_path: Path, spec: dict[str, Any] | None = None) -> Path:
    (tmp_path / "rootfs").mkdir(parents=True, exist_ok=True)
    config = spec if spec is not None else oci.default_spec()
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# ---------------------------------------------------------------------------- spec


@pytest.mark.parametrize("cid", ["a", "web-1", "x.y_z+1", "A" * 64])
def test_valid_ids(cid: str) -> None:
    oci.check_id(cid)


@pytest.mark.parametrize("cid", ["", ".", "..", "a/b", "a b", "é", "a:b"])
def test_invalid_ids(cid: str) -> None:
    with pytest.raises(InvalidConfig, match="invalid container id"):
        oci.check_id(cid)


def test_default_spec_loads(tmp_path: Path) -> None:
    spec, rootfs = oci.load_bundle(str(_bundle(tmp_path)))
    assert rootfs == str(tmp_path / "rootfs")
    assert spec["process"]["args"] == ["sh"] and spec["process"]["terminal"] is True
    caps = spec["process"]["capabilities"]["bounding"]
    assert set(caps) == set(oci.DEFAULT_CAPS) and len(caps) == 14
    kinds = [n["type"] for n in spec["linux"]["namespaces"]]
    assert kinds == ["pid", "network", "ipc", "uts", "mount", "cgroup"]
    assert spec["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert spec["linux"]["seccomp"]["defaultAction"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]


def test_rootless_spec_has_user_namespace() -> None:
    spec = oci.default_spec(rootless=True)
    kinds = [n["type"] for n in spec["linux"]["namespaces"]]
    assert "user" in kinds and "network" not in kinds
    assert spec["linux"]["uidMappings"][0]["hostID"] == os.getuid()


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"no config\.json"):
        oci.load_bundle(str(tmp_path))


def test_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(InvalidConfig, match="malformed"):
        oci.load_bundle(str(tmp_path))


def test_missing_rootfs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(oci.default_spec()))
    with pytest.raises(NotFound, match="rootfs"):
        oci.load_bundle(str(tmp_path))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["linux"]["namespaces"].append({"type": "bogus"}), "unknown namespace"),
        (lambda s: s["linux"]["namespaces"].append({"type": "pid"}), "listed twice"),
        (lambda s: s["process"].update(args=[]), "process.args"),
        (lambda s: s["process"].update(cwd="rel"), "absolute"),
        (lambda s: s.update(ociVersion="2.0.0"), "ociVersion"),
        (lambda s: s.update(hooks={"nope": []}), "unknown hook type"),
        (lambda s: s.update(hooks={"prestart": [{"path": "rel"}]}), "absolute path"),
        (lambda s: s["linux"].update(uidMappings=[{}]), "user namespace"),
    ],
)
def test_invalid_specs(tmp_path: Path, mutate: Any, message: str) -> None:
    spec = oci.default_spec()
    mutate(spec)
    with pytest.raises(InvalidConfig, match=message):
        oci.load_bundle(str(_bundle(tmp_path, spec)))


def test_features_shape() -> None:
    f = oci.features()
    assert f["ociVersionMin"] <= f["ociVersionMax"]
    assert set(f["hooks"]) == set(oci.HOOK_TYPES)
    assert "CAP_CHOWN" in f["linux"]["capabilities"]
    assert f["linux"]["cgroup"]["systemd"] is False
    assert f["linux"]["apparmor"] == {"enabled": False}


# ---------------------------------------------------------------------------- resources


def test_cgroup_paths() -> None:
    assert rt.cgroup_path({}, "web") == "vz-runtime/web"
    assert rt.cgroup_path({"linux": {"cgroupsPath": "/a/b"}}, "web") == "a/b"
    with pytest.raises(HostUnsupported, match="systemd"):
        rt.cgroup_path({"linux": {"cgroupsPath": "system.slice:vz:web"}}, "web")


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("text", "num"), [("KILL", 9), ("SIGKILL", 9), ("9", 9), ("term", 15), ("RTMIN+2", 36)]
)
def test_parse_signal(text: str, num: int) -> None:
    assert control.parse_signal(text) == num


@pytest.mark.parametrize("text", ["NOPE", "0", "99", ""])
def test_parse_signal_rejects(text: str) -> None:
    with pytest.raises(InvalidConfig):
        control.parse_signal(text)


# ---------------------------------------------------------------------------- state


def test_proc_start_time_and_alive() -> None:
    info = proc_start_time(os.getpid())
    assert info is not None and info[1] == "R"
    assert alive(os.getpid(), info[0])
    assert not alive(os.getpid(), info[0] + 1)  # a reused pid has another start time
    assert not alive(0, 0)


def test_status_derivation(tmp_path: Path) -> None:
    me = proc_start_time(os.getpid())
    assert me is not None
    st = State(str(tmp_path), "c", {"pid": os.getpid(), "startTime": me[0], "created": True})
    (tmp_path / "exec.fifo").write_text("")
    assert st.status() == "created"
    (tmp_path / "exec.fifo").unlink()
    assert st.status() == "running"
    freezer = tmp_path / "freezer.state"
    freezer.write_text("FROZEN\n")
    st.data["freezer"] = str(freezer)
    assert st.status() == "paused"
    st.data["startTime"] = me[0] + 1
    assert st.status() == "stopped"
    assert st.oci()["pid"] == 0


def test_state_for_missing_container(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load(str(tmp_path), "ghost")


def test_create_refuses_existing_id(tmp_path: Path) -> None:
    b = _bundle(tmp_path / "b")
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = False
    (b / "config.json").write_text(json.dumps(spec))
    (tmp_path / "root" / "dup").mkdir(parents=True)
    with pytest.raises(Conflict, match="already exists"):
        rt.create(str(tmp_path / "root"), "dup", str(b))


def test_terminal_needs_console_socket(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="console-socket"):
        rt.create(str(tmp_path / "root"), "c", str(_bundle(tmp_path / "b")))
    assert not (tmp_path / "root" / "c").exists()


def test_start_of_stopped_container(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "state.json").write_text(json.dumps({"pid": 0, "created": True}))
    with pytest.raises(StateError, match="stopped"):
        rt.start(str(tmp_path), "c")


def test_exec_process_overrides() -> None:
    config = oci.default_spec()
    proc = execute.exec_process_from(
        config,
        args=["id"],
        tty=False,
        cwd="/tmp",
        env=["TERM=dumb", "X=1"],
        user="1000:1000",
        no_new_privs=False,
        caps_add=["CAP_SYS_TIME"],
    )
    assert proc["args"] == ["id"] and proc["cwd"] == "/tmp"
    assert proc["user"] == {"uid": 1000, "gid": 1000}
    assert "TERM=dumb" in proc["env"] and "TERM=xterm" not in proc["env"]
    assert "CAP_SYS_TIME" in proc["capabilities"]["bounding"]
    assert "CAP_SYS_TIME" not in config["process"]["capabilities"]["bounding"]


# ---------------------------------------------------------------------------- CLI


def test_cli_state_of_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "state", "ghost"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: container 'ghost' does not exist") and "hint:" in err


def test_cli_json_log(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    args = ["--root", str(tmp_path), "--log", str(log), "--log-format", "json", "kill", "x"]
    assert main(args) == 1
    entry = json.loads(log.read_text().splitlines()[0])
    assert set(entry) == {"level", "msg", "time"} and entry["level"] == "error"


def test_cli_list_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path / "none"), "list", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_imports_stay_light() -> None:
    code = (
        "import sys; from vzkit_runtime import cli, runtime; "
        "print(sorted(m for m in ('pydantic', 'subprocess', 'asyncio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
