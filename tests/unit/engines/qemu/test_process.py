"""The jail's shell commands: what is mounted into QEMU's root, quoted, before the pivot."""

from __future__ import annotations

import shlex
from pathlib import Path

from vzkit.engines.qemu.process import Jail, _wrapper, jail_script


def _commands(script: str) -> list[list[str]]:
    """Each simple command of the script as its words (``;`` separates commands)."""
    out: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in lexer:
            if word == ";":
                out.append(command)
                command = []
            else:
                command.append(word)
        out.append(command)
    return [c for c in out if c]


def test_only_the_kept_paths_the_system_and_the_devices_are_mounted(tmp_path: Path) -> None:
    odd = tmp_path / "state dir" / "it's here"
    odd.mkdir(parents=True)
    (tmp_path / "console.log").write_text("")
    jail = Jail(keep=((odd, False), (tmp_path / "console.log", False), (Path("/usr"), True)))
    commands = _commands(jail_script(jail))
    binds = [c[-2:] for c in commands if c[:1] == ["mount"] and "bind" in " ".join(c[1:-2])]
    sources = {src for src, _ in binds}
    # Each bind lands at its own path under the new root (the script runs there).
    assert all(dst == "." + src for src, dst in binds if src != "/proc")
    assert str(odd) in sources and str(tmp_path / "console.log") in sources
    assert sources <= {str(odd), str(tmp_path / "console.log"), "/proc"} | {
        p for p in ("/usr", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
    } | {f"/dev/{d}" for d in jail.devices}
    order = [c[0] for c in commands if c]
    pivot = order.index("pivot_root")
    assert "mount" not in order[pivot + 1 : -1], "nothing of the host is mounted after the pivot"
    assert commands[-1] == ["mount", "-o", "remount,bind,ro", "/"]
    # The host's /proc serves umount for a moment, then goes.
    assert ["umount", "-l", "/.old", "/proc"] in commands


def test_without_a_jail_only_the_cgroups_are_joined() -> None:
    argv = _wrapper([Path("/sys/fs/cgroup/pids/x/cgroup.procs")], None, ["qemu", "-S"])
    assert argv[:2] == ["/bin/sh", "-c"] and "pivot_root" not in argv[2]
    assert argv[-2:] == ["qemu", "-S"]
    jailed = _wrapper([], Jail(keep=(), user=(995, 994)), ["qemu"])
    assert jailed[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert jailed[-2:] == ["--", "qemu"] and "--reuid=995" in jailed
