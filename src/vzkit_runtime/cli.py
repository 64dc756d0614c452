"""`vz-runtime`: an OCI runtime with runc's command line.

Start-up time is the runtime's main cost (a container engine runs it several times per
container), so the hot commands (create, run, start, state, kill, delete) are parsed by
hand and import only os, sys and the modules they use; argparse (several ms with the
``re``, ``gettext``, ``shutil`` and ``locale`` it pulls in) is imported only for the other
commands, ``--help`` and usage errors, which it reports exactly as before.

Besides runc's commands, four of its own (hand-parsed too): ``mount [--readonly] ID SOURCE
TARGET`` and ``umount ID TARGET`` attach storage to a running container (livemount.py);
``file-read`` and ``file-write`` copy a file out of or into it without running any of its
binaries (files.py).
"""

from __future__ import annotations

import sys

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import HostUnsupported, InvalidConfig, VzRuntimeError
from vzkit_runtime.state import DEFAULT_ROOT

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    import argparse
    from typing import Any, NoReturn

    from vzkit_runtime.spec import Json


class Logger:
    """--log / --log-format: runc writes its errors there for the caller to read."""

    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.debug_on = debug

    def _write(self, level: str, msg: str) -> None:
        if not self.path:
            return
        import time

        t = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": stamp})
        else:
            line = f"time={json.dumps(stamp)} level={level} msg={json.dumps(msg)}"
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # logging must never be why a container operation fails

    def error(self, msg: str) -> None:
        self._write("error", msg)

    def warn(self, msg: str) -> None:
        self._write("warning", msg)
        sys.stderr.write(f"warning: {msg}\n")

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self._write("debug", msg)


def _parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="vz-runtime", description="vzkit's OCI runtime (runc-compatible command line)"
    )
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory (%(default)s)")
    p.add_argument("--log", help="append errors and warnings to this file")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    p.add_argument("--systemd-cgroup", action="store_true", help="unsupported; rejected")
    p.add_argument("--rootless", default="auto", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    def create_flags(c: argparse.ArgumentParser) -> None:
        c.add_argument("--bundle", "-b", default=".", help="bundle directory (default: cwd)")
        c.add_argument("--pid-file", help="write the init's host pid here")
        c.add_argument("--console-socket", help="unix socket that receives the pty master")
        c.add_argument("--no-pivot", action="store_true", help="accepted; pivot_root is used")
        c.add_argument("--no-new-keyring", action="store_true", help="accepted; ignored")
        c.add_argument("--preserve-fds", type=int, default=0, help="pass fds 3..3+N-1 on")
        c.add_argument("id")

    create_flags(cmd("create", "create a container (its process waits for start)"))
    r = cmd("run", "create, start, wait for and delete a container")
    create_flags(r)
    r.add_argument("--detach", "-d", action="store_true", help="do not wait for the process")
    r.add_argument("--keep", action="store_true", help="do not delete the container after")
    r.add_argument("--rm", action="store_true", help=argparse.SUPPRESS)
    cmd("start", "start a created container").add_argument("id")
    s = cmd("state", "print the container's state as JSON")
    s.add_argument("id")
    k = cmd("kill", "send a signal to the container's init (or all its processes)")
    k.add_argument("--all", "-a", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="TERM")
    d = cmd("delete", "delete a stopped container")
    d.add_argument("--force", "-f", action="store_true", help="kill it first if it runs")
    d.add_argument("id")
    e = cmd("exec", "run a process in a running container")
    e.add_argument("--process", "-p", help="OCI process JSON file")
    e.add_argument("--tty", "-t", action="store_true")
    e.add_argument("--console-socket")
    e.add_argument("--console-size", help="ROWSxCOLS: the terminal's size from the start")
    e.add_argument("--cwd")
    e.add_argument("--env", "-e", action="append", default=[])
    e.add_argument("--user", "-u")
    e.add_argument("--cap", "-c", action="append", default=[])
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("--detach", "-d", action="store_true")
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("id")
    e.add_argument("args", nargs=argparse.REMAINDER)
    for name in ("ps", "list"):
        c = cmd(name, "list the container's processes" if name == "ps" else "list containers")
        c.add_argument("--format", "-f", choices=("table", "json"), default="table")
        if name == "ps":
            c.add_argument("id")
        else:
            c.add_argument("--quiet", "-q", action="store_true")
    cmd("pause", "freeze every process of the container").add_argument("id")
    cmd("resume", "thaw a paused container").add_argument("id")
    sp = cmd("spec", "write a default config.json")
    sp.add_argument("--bundle", "-b", default=".")
    sp.add_argument("--rootless", action="store_true")
    cmd("features", "print what this runtime supports (JSON)")
    u = cmd("update", "change a running container's cgroup limits")
    u.add_argument("--resources", "-r", help="OCI linux.resources JSON file ('-' = stdin)")
    u.add_argument("--memory", type=int)
    u.add_argument("--memory-swap", type=int)
    u.add_argument("--cpu-quota", type=int)
    u.add_argument("--cpu-period", type=int)
    u.add_argument("--cpu-shares", type=int)
    u.add_argument("--cpuset-cpus")
    u.add_argument("--pids-limit", type=int)
    u.add_argument("--blkio-weight", type=int)
    u.add_argument("id")
    m = cmd("mount", "bind-mount a host path into a running container (not OCI)")
    m.add_argument("--readonly", action="store_true", help="make the mount read-only")
    m.add_argument("id")
    m.add_argument("source", help="host path: a directory or a file")
    m.add_argument("target", help="absolute path in the container (created if missing)")
    um = cmd("umount", "detach a mount from a running container (not OCI)")
    um.add_argument("id")
    um.add_argument("target", help="absolute path of the mount in the container")
    fr = cmd("file-read", "copy a file of a running container to stdout (not OCI)")
    fr.add_argument("--header", action="store_true", help="first a JSON line: mode, size")
    fr.add_argument("id")
    fr.add_argument("path", help="the path as the container sees it")
    fw = cmd("file-write", "replace a file of a running container with stdin (not OCI)")
    fw.add_argument("--mode", "-m", default="644", help="octal permissions (%(default)s)")
    fw.add_argument("--parents", "-p", action="store_true", help="create missing directories")
    fw.add_argument("--allow-setid", action="store_true", help="allow setuid/setgid modes")
    fw.add_argument("id")
    fw.add_argument("path", help="the path as the container sees it")
    return p


class Args:
    """argparse.Namespace's stand-in for the hand-parsed commands."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


_GLOBAL_VALUES = {
    "--root": "root",
    "--log": "log",
    "--log-format": "log_format",
    "--rootless": "rootless",
}
_GLOBAL_FLAGS = {"--debug": "debug", "--systemd-cgroup": "systemd_cgroup"}
_CREATE_VALUES = {
    "--bundle": "bundle",
    "-b": "bundle",
    "--pid-file": "pid_file",
    "--console-socket": "console_socket",
    "--preserve-fds": "preserve_fds",
}
_CREATE_FLAGS = {"--no-pivot": "no_pivot", "--no-new-keyring": "no_new_keyring"}
_RUN_FLAGS = {**_CREATE_FLAGS, "--detach": "detach", "-d": "detach", "--keep": "keep", "--rm": "rm"}
#: command -> (options taking a value, flags, positional names, optional positional defaults)
_FAST: dict[str, tuple[dict[str, str], dict[str, str], tuple[str, ...], dict[str, str]]] = {
    "create": (_CREATE_VALUES, _CREATE_FLAGS, ("id",), {}),
    "run": (_CREATE_VALUES, _RUN_FLAGS, ("id",), {}),
    "start": ({}, {}, ("id",), {}),
    "state": ({}, {}, ("id",), {}),
    "delete": ({}, {"--force": "force", "-f": "force"}, ("id",), {}),
    "kill": ({}, {"--all": "all", "-a": "all"}, ("id", "signal"), {"signal": "TERM"}),
    "mount": ({}, {"--readonly": "readonly"}, ("id", "source", "target"), {}),
    "umount": ({}, {}, ("id", "target"), {}),
    "file-read": ({}, {"--header": "header"}, ("id", "path"), {}),
    "file-write": (
        {"--mode": "mode", "-m": "mode"},
        {"--parents": "parents", "-p": "parents", "--allow-setid": "allow_setid"},
        ("id", "path"),
        {},
    ),
}
_DEFAULTS: dict[str, Any] = {
    "root": DEFAULT_ROOT,
    "log": None,
    "log_format": "text",
    "debug": False,
    "systemd_cgroup": False,
    "rootless": "auto",
    "bundle": ".",
    "pid_file": None,
    "console_socket": None,
    "preserve_fds": 0,
    "mode": "644",
}


_EXEC_VALUES = {
    "--process": "process",
    "-p": "process",
    "--console-socket": "console_socket",
    "--console-size": "console_size",
    "--cwd": "cwd",
    "--user": "user",
    "-u": "user",
    "--pid-file": "pid_file",
    "--preserve-fds": "preserve_fds",
}
_EXEC_LISTS = {"--env": "env", "-e": "env", "--cap": "cap", "-c": "cap"}
_EXEC_FLAGS = {
    "--tty": "tty",
    "-t": "tty",
    "--no-new-privs": "no_new_privs",
    "--detach": "detach",
    "-d": "detach",
}


def _fast_exec(argv: list[str], i: int, out: dict[str, Any]) -> Args | None:
    """`exec [options] ID [--] ARGS...` (an engine's every exec pays for argparse else)."""
    out.update(command="exec", process=None, console_socket=None, console_size=None, cwd=None,
               user=None,
               pid_file=None, preserve_fds=0, env=[], cap=[], tty=False,
               no_new_privs=False, detach=False)  # fmt: skip
    n = len(argv)
    while i < n and argv[i].startswith("-") and argv[i] != "--":
        opt, eq, val = argv[i].partition("=")
        i += 1
        if opt in _EXEC_FLAGS and not eq:
            out[_EXEC_FLAGS[opt]] = True
            continue
        if opt not in _EXEC_VALUES and opt not in _EXEC_LISTS:
            return None
        if not eq:
            if i >= n:
                return None
            val = argv[i]
            i += 1
        if opt in _EXEC_LISTS:
            out[_EXEC_LISTS[opt]].append(val)
        else:
            out[_EXEC_VALUES[opt]] = val
    if i >= n or argv[i] == "--":
        return None
    out["id"] = argv[i]
    out["args"] = argv[i + 1 :]
    return _finish(out)


def _finish(out: dict[str, Any]) -> Args | None:
    """Shared tail of the hand parsers: numbers, global defaults, a last check."""
    if "preserve_fds" in out:
        try:
            out["preserve_fds"] = int(out["preserve_fds"])
        except ValueError:
            return None
    for name in ("root", "log", "log_format", "debug", "systemd_cgroup", "rootless"):
        out.setdefault(name, _DEFAULTS[name])
    if out["log_format"] not in ("text", "json"):
        return None
    return Args(**out)


def _fast_parse(argv: list[str]) -> Args | None:
    """The hot commands without argparse; None for anything else (argparse decides)."""
    out: dict[str, Any] = {}
    i, n = 0, len(argv)
    while i < n and argv[i].startswith("-"):
        opt, eq, val = argv[i].partition("=")
        if opt in _GLOBAL_VALUES:
            if not eq:
                i += 1
                if i >= n:
                    return None
                val = argv[i]
            out[_GLOBAL_VALUES[opt]] = val
        elif opt in _GLOBAL_FLAGS and not eq:
            out[_GLOBAL_FLAGS[opt]] = True
        else:
            return None
        i += 1
    if i < n and argv[i] == "exec":
        return _fast_exec(argv, i + 1, out)
    if i >= n or argv[i] not in _FAST:
        return None
    command = argv[i]
    values, flags, names, optional = _FAST[command]
    pos: list[str] = []
    only_pos = False
    for name in values.values():
        out[name] = _DEFAULTS[name]
    for name in flags.values():
        out[name] = False
    i += 1
    while i < n:
        tok = argv[i]
        i += 1
        if only_pos or not tok.startswith("-") or tok == "-":
            pos.append(tok)
            continue
        if tok == "--":
            only_pos = True
            continue
        opt, eq, val = tok.partition("=")
        if opt in values:
            if not eq:
                if i >= n:
                    return None
                val = argv[i]
                i += 1
            out[values[opt]] = val
        elif opt in flags and not eq:
            out[flags[opt]] = True
        else:
            return None
    if not len(names) - len(optional) <= len(pos) <= len(names):
        return None
    for k, name in enumerate(names):
        out[name] = pos[k] if k < len(pos) else optional[name]
    out["command"] = command
    return _finish(out)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _dispatch(a: Any, log: Logger) -> int:
    c = a.command
    if c == "state":
        from vzkit_runtime.state import load

        _print_json(load(a.root, a.id).oci())
        return 0
    if c in ("create", "run", "start"):
        return _lifecycle(a, log)
    if c in ("kill", "delete", "ps", "pause", "resume", "update"):
        return _control(a, log)
    if c in ("mount", "umount"):
        from vzkit_runtime import livemount

        if c == "mount":
            livemount.mount(a.root, a.id, a.source, a.target, readonly=a.readonly)
        else:
            livemount.umount(a.root, a.id, a.target)
        return 0
    if c in ("file-read", "file-write"):
        return _files(a)
    if c == "exec":
        return _exec(a)
    if c == "list":
        return _list(a)
    if c == "spec":
        return _spec(a)
    if c == "features":
        from vzkit_runtime.spec import features

        _print_json(features())
        return 0
    raise InvalidConfig(f"unknown command {c!r}")


def _lifecycle(a: Any, log: Logger) -> int:
    from vzkit_runtime import runtime as rt

    if a.command == "start":
        rt.start(a.root, a.id, warn=log.warn)
        return 0
    opts = {
        "pid_file": a.pid_file,
        "console_socket": a.console_socket,
        "preserve_fds": a.preserve_fds,
        "warn": log.warn,
    }
    if a.command == "create":
        rt.create(a.root, a.id, a.bundle, **opts)
        return 0
    return rt.run(a.root, a.id, a.bundle, detach=a.detach, keep=a.keep, **opts)


def _control(a: Any, log: Logger) -> int:
    from vzkit_runtime import control

    c = a.command
    if c == "kill":
        control.kill(a.root, a.id, control.parse_signal(a.signal), all_=a.all)
    elif c == "delete":
        control.delete(a.root, a.id, force=a.force, warn=log.warn)
    elif c in ("pause", "resume"):
        control.pause(a.root, a.id, frozen=c == "pause")
    elif c == "update":
        control.update(a.root, a.id, _resources(a), warn=log.warn)
    else:  # ps
        pids = control.ps(a.root, a.id)
        if a.format == "json":
            sys.stdout.write(json.dumps(pids) + "\n")
        else:
            sys.stdout.write("PID     CMD\n")
            for pid in pids:
                sys.stdout.write(f"{pid:<7} {control.cmdline(pid)}\n")
    return 0


def _files(a: Any) -> int:
    from vzkit_runtime import files

    if a.command == "file-read":
        files.read(a.root, a.id, a.path, header=a.header)
    else:
        files.write(
            a.root, a.id, a.path, mode=files.parse_mode(a.mode), parents=a.parents,
            allow_setid=a.allow_setid,
        )  # fmt: skip
    return 0


def _console_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    rows, sep, cols = text.partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit():
        raise InvalidConfig(f"invalid --console-size {text!r}", hint="give ROWSxCOLS, e.g. 24x80")
    return int(rows), int(cols)


def _exec(a: Any) -> int:
    from vzkit_runtime import execute as rt
    from vzkit_runtime.state import load

    if a.process:
        try:
            with open(a.process) as f:
                process: Json = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"cannot read process file {a.process}: {exc}") from None
    else:
        args = list(a.args)
        if args and args[0] == "--":
            args = args[1:]
        process = rt.exec_process_from(
            load(a.root, a.id).config(),
            args=args,
            tty=a.tty,
            console_size=_console_size(a.console_size),
            cwd=a.cwd,
            env=a.env,
            user=a.user,
            no_new_privs=a.no_new_privs,
            caps_add=a.cap,
        )
    code: int = rt.exec_process(
        a.root,
        a.id,
        process,
        console_socket=a.console_socket,
        pid_file=a.pid_file,
        detach=a.detach,
        preserve_fds=a.preserve_fds,
    )
    return code


def _list(a: Any) -> int:
    from vzkit_runtime.state import list_ids, load

    rows: list[Json] = []
    for cid in list_ids(a.root):
        try:
            st = load(a.root, cid)
        except VzRuntimeError:
            continue
        state = st.oci()
        state["owner"] = st.data.get("owner", 0)
        rows.append(state)
    if a.quiet:
        sys.stdout.write("".join(f"{r['id']}\n" for r in rows))
    elif a.format == "json":
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        sys.stdout.write(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED\n")
        for r in rows:
            sys.stdout.write(
                f"{r['id']:<20} {r['pid']:<8} {r['status']:<10} {r['bundle']:<40} "
                f"{r.get('created', '')}\n"
            )
    return 0


def _spec(a: Any) -> int:
    from vzkit_runtime.spec import default_spec
    from vzkit_runtime.state import write_atomic

    path = os.path.join(a.bundle, "config.json")
    if not os.path.isdir(a.bundle):
        raise InvalidConfig(
            f"bundle directory {a.bundle} does not exist", hint="create it, or pass --bundle DIR"
        )
    if os.path.exists(path):
        raise InvalidConfig(f"{path} already exists", hint="remove it first")
    write_atomic(path, (json.dumps(default_spec(rootless=a.rootless), indent=2) + "\n").encode())
    return 0


def _resources(a: Any) -> Json:
    if a.resources:
        try:
            if a.resources == "-":
                res: Json = json.loads(sys.stdin.read())
            else:
                with open(a.resources) as f:
                    res = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"cannot read resources {a.resources}: {exc}") from None
        return res
    res = {}
    mem: Json = {}
    if a.memory is not None:
        mem["limit"] = a.memory
    if a.memory_swap is not None:
        mem["swap"] = a.memory_swap
    if mem:
        res["memory"] = mem
    cpu: Json = {}
    if a.cpu_shares is not None:
        cpu["shares"] = a.cpu_shares
    if a.cpu_quota is not None:
        cpu["quota"] = a.cpu_quota
    if a.cpu_period is not None:
        cpu["period"] = a.cpu_period
    if a.cpuset_cpus:
        cpu["cpus"] = a.cpuset_cpus
    if cpu:
        res["cpu"] = cpu
    if a.pids_limit is not None:
        res["pids"] = {"limit": a.pids_limit}
    if a.blkio_weight is not None:
        res["blockIO"] = {"weight": a.blkio_weight}
    if not res:
        raise InvalidConfig("update: nothing to change", hint="pass e.g. --memory BYTES")
    return res


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    a = _fast_parse(argv) or _parser().parse_args(argv)
    log = Logger(a.log, a.log_format, a.debug)
    try:
        if a.systemd_cgroup:
            raise HostUnsupported(
                "--systemd-cgroup is not supported",
                hint="vz-runtime manages cgroupfs directly; drop the flag",
            )
        return _dispatch(a, log)
    except VzRuntimeError as exc:
        log.error(exc.message)
        sys.stderr.write(f"error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        if a.debug:
            import traceback

            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        return 130


def launch() -> NoReturn:
    """main() for a process of its own (the launcher, ``python -m vzkit_runtime``): exit
    without the interpreter's tear-down, which costs as many instructions as a fifth of
    a container's creation (freeing every module, a last garbage collection). Nothing of
    the runtime needs it: files are closed and written by then, stdio is flushed here."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    launch()
