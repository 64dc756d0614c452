"""Handlers for each ``vz`` command: check arguments locally, call the SDK, render.

Each handler returns the process exit status. Model imports stay inside handlers that need
them so ``vz run`` never waits on pydantic before its request reaches the daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzkit.cli import checks, netcmds, obscmds, remotecmds, snapcmds, storecmds
from vzkit.cli.checks import UsageError
from vzkit.cli.render import (
    Progress,
    age_since,
    dump_json,
    dump_models,
    flatten,
    format_size,
    json_mode,
    key_values,
    table,
)
from vzkit.errors import DaemonUnavailable, VzError
from vzkit.sdk.client import Client, preload

if TYPE_CHECKING:
    from vzkit.api.instances import ExecResult, ImageInfo, Instance

Handler = Callable[[argparse.Namespace, Client], int]


def _client(args: argparse.Namespace, *, autostart: bool = True) -> Client:
    from vzkit.settings import default_remote

    remote = args.remote_name or (None if args.socket else default_remote())
    return Client(args.socket, autostart=autostart and not args.no_autostart, remote=remote)


def dispatch(args: argparse.Namespace) -> int:
    key = args.cmd
    subs = ("file_cmd", "config_cmd", "network_cmd", "port_cmd", "firewall_cmd", "snapshot_cmd")
    more = ("storage_cmd", "volume_cmd", "image_cmd", "host_cmd", "daemon_cmd", "remote_cmd")
    for sub in (*subs, *more, "trust_cmd"):
        if getattr(args, sub, None):
            key = f"{args.cmd}.{getattr(args, sub)}"
    if key.startswith("remote."):
        return remotecmds.REMOTE_HANDLERS[key](args)  # this host's files only: no vzd
    handler = _HANDLERS[key]
    if key.startswith("daemon."):
        return handler(args, _client(args, autostart=False))
    with _client(args) as client:
        return handler(args, client)


def print_error(exc: VzError) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")


def _out() -> Any:
    return sys.stdout


def _json_mode(args: argparse.Namespace) -> bool:
    return json_mode(args)


# -- run / exec -------------------------------------------------------------------------------


def exit_status(result: ExecResult) -> int:
    """Map a guest command's outcome onto this process's exit status, as a shell would."""
    if result.timed_out:
        sys.stderr.write("error: the command timed out and was killed\n")
        return 124
    if result.error:
        sys.stderr.write(f"error: {result.error}\n")
        return result.exit_code if result.exit_code > 0 else 1
    if result.signal:
        return 128 + result.signal
    if result.exit_code < 0:
        return 128 + (-result.exit_code & 0x7F)
    return result.exit_code & 0xFF


def _stdin_for(args: argparse.Namespace) -> Any:
    # A terminal is only read when asked (-i): a stray `vz run` must not swallow typing.
    if args.interactive or not os.isatty(0):
        return sys.stdin.buffer
    return None


def _exec_checks(args: argparse.Namespace, usage: str) -> dict[str, Any]:
    if not args.command:
        raise UsageError("no command given", hint=f"put the command after --: {usage}")
    if args.tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin", hint="drop -t when piping input")
    return {
        "env": checks.parse_env(args.env),
        "cwd": args.workdir,
        "timeout": checks.check_timeout(args.timeout),
    }


def _run_command(client: Client, name: str, args: argparse.Namespace, opts: dict[str, Any]) -> int:
    if args.tty:
        result = client.exec_interactive(name, args.command, tty=True, **opts)
    else:
        result = client.exec(
            name,
            args.command,
            stdin=_stdin_for(args),
            stdout=sys.stdout.buffer,
            stderr=sys.stderr.buffer,
            **opts,
        )
    return exit_status(result)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    # Cleanup must finish: a second Ctrl-C during the delete would leave the instance behind.
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_run(args: argparse.Namespace, client: Client) -> int:
    if (args.image is None) == (args.source is None):
        raise UsageError(
            "give an image or --from INSTANCE/SNAPSHOT, not both or neither",
            hint="vz run minimal -- CMD, or vz run --from web/s1 -- CMD",
        )
    image = checks.check_name(args.image, "image") if args.image else "minimal"
    # Naming it here means an interrupted create can still be found and deleted.
    name = checks.check_name(args.name) if args.name else f"run-{os.urandom(4).hex()}"
    body = _create_body(args, image, name)
    body.update(ephemeral=True, start=True)
    if args.source:
        body.update(source=args.source)
        body.pop("image")
    opts = _exec_checks(args, "vz run IMAGE -- CMD...")
    preload("websockets.sync.client")
    if not args.source:
        _ensure_image(client, image)
    created = False
    try:
        try:
            _warn(client.create_instance(body))
        except VzError as exc:
            # The daemon answered with an error: nothing was made (unless we lost it mid-way).
            created = isinstance(exc, DaemonUnavailable)
            raise
        except BaseException:
            created = True
            raise
        created = True
        return _run_command(client, name, args, opts)
    finally:
        if created and not args.keep:
            with _sigint_deferred():
                client.delete_quietly(name)
        elif created:
            sys.stderr.write(f"kept instance {name}\n")


def _create_body(args: argparse.Namespace, image: str, name: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"image": image, "name": name}
    if args.type:
        body["type"] = args.type
    if args.accel:
        body["accel"] = args.accel
    limits: dict[str, Any] = {}
    if args.cpus is not None:
        limits["cpus"] = checks.check_cpus(args.cpus)
    if args.memory is not None:
        limits["memory"] = checks.check_memory(args.memory)
    if args.cpu_weight is not None:
        limits["cpu_weight"] = checks.check_cpu_weight(args.cpu_weight)
    if args.cpu_pin is not None:
        limits["cpu_pin"] = checks.parse_cpu_list(args.cpu_pin)
    if limits:
        body["limits"] = limits
    if args.network:
        body["nics"] = (
            [] if args.network == ["none"] else [checks.parse_nic(n) for n in args.network]
        )
    if args.port:
        body["ports"] = [checks.parse_port(spec) for spec in args.port]
    if args.volume:
        body["volumes"] = [storecmds.parse_volume(spec) for spec in args.volume]
    if args.privileged:
        body["security"] = {"privileged": True}
    return body


def _warn(inst: Instance) -> None:
    for warning in inst.warnings:
        sys.stderr.write(f"warning: {warning}\n")


def _ensure_image(client: Client, image: str) -> None:
    if client.has_image(image):
        return
    progress = Progress(f"building image {image}")
    try:
        client.build_image(image, progress=progress)
    finally:
        progress.done()


def cmd_exec(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    opts = _exec_checks(args, f"vz exec {name} -- CMD...")
    return _run_command(client, name, args, opts)


def cmd_shell(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    if not os.isatty(0):
        raise UsageError("vz shell needs a terminal", hint=f"use: vz exec {name} -- sh")
    return exit_status(client.exec_interactive(name, ["/bin/sh", "-l"], tty=True))


def cmd_console(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    if args.show_log:
        sys.stdout.flush()
        sys.stdout.buffer.write(client.console_log(name))
        sys.stdout.buffer.flush()
        return 0
    client.console(name)
    return 0


# -- instances --------------------------------------------------------------------------------


def cmd_launch(args: argparse.Namespace, client: Client) -> int:
    image = checks.check_name(args.image, "image")
    name = checks.check_name(args.name) if args.name else None
    body = _create_body(args, image, name)
    _ensure_image(client, image)
    inst = client.create_instance(body)
    _warn(inst)
    if _json_mode(args):
        _out().write(inst.model_dump_json(indent=2) + "\n")
    else:
        _out().write(f"{inst.name}\n")
    return 0


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    items = client.list_instances()
    if _json_mode(args):
        dump_models(items, _out())
        return 0
    rows = [
        (
            i.name,
            i.type.value,
            i.state.value,
            i.image,
            i.limits.cpus,
            format_size(i.limits.memory),
            ",".join(str(n.ip) for n in i.nics) or "-",
            i.pid,
            age_since(i.created_at),
        )
        for i in sorted(items, key=lambda i: i.name)
    ]
    head = ("NAME", "TYPE", "STATE", "IMAGE", "CPUS", "MEMORY", "IPV4", "PID", "AGE")
    table(head, rows, _out())
    return 0


def instance_pairs(i: Instance) -> list[tuple[str, object]]:
    return [
        ("name", i.name),
        ("type", i.type.value),
        ("state", i.state.value),
        ("reason", i.reason),
        ("image", i.image),
        ("image digest", i.image_digest),
        ("cpus", i.limits.cpus),
        ("memory", format_size(i.limits.memory)),
        ("cpu weight", i.limits.cpu_weight),
        ("cpu pin", ",".join(map(str, i.limits.cpu_pin)) if i.limits.cpu_pin else "any"),
        ("processes", i.limits.processes),
        ("privileged", "yes" if i.security.privileged else "no"),
        ("accel", i.accel.value if i.accel else None),
        ("ephemeral", "yes" if i.ephemeral else "no"),
        ("pid", i.pid),
        ("created", f"{i.created_at.isoformat()} ({age_since(i.created_at)} ago)"),
        ("started", i.started_at.isoformat() if i.started_at else None),
        ("agent", i.agent_version),
        ("kernel", i.kernel_release),
        *netcmds.network_pairs(i),
        *(
            (
                f"volume {v.pool}/{v.volume}",
                (v.path or "disk") + (" (read-only)" if v.readonly else ""),
            )
            for v in i.volumes
        ),
    ]


def cmd_info(args: argparse.Namespace, client: Client) -> int:
    inst = client.get_instance(checks.check_name(args.name))
    if _json_mode(args):
        _out().write(inst.model_dump_json(indent=2) + "\n")
    else:
        key_values(instance_pairs(inst), _out())
    return 0


def _each(
    args: argparse.Namespace, action: Callable[[str], Instance | None], done: str | None
) -> int:
    names = [checks.check_name(n) for n in args.names]
    failed = 0
    results: list[Any] = []
    for name in names:
        try:
            inst = action(name)
        except VzError as exc:
            # One bad name does not stop the rest; a single name reports as any error does.
            if len(names) == 1:
                raise
            failed += 1
            print_error(exc)
            continue
        if inst is not None:
            results.append(inst.model_dump(mode="json"))
            if not _json_mode(args):
                _out().write(f"{name}: {inst.state.value}\n")
        else:
            results.append({"name": name, "status": done})
            if not _json_mode(args):
                _out().write(f"{name}: {done}\n")
    if _json_mode(args):
        dump_json(results, _out())
    return 1 if failed else 0


def _state_cmd(action: str) -> Handler:
    def handler(args: argparse.Namespace, client: Client) -> int:
        if action in ("stop", "restart"):
            checks.check_timeout(args.timeout)
            method = getattr(client, action)
            return _each(args, lambda n: method(n, force=args.force, timeout=args.timeout), None)
        return _each(args, getattr(client, action), None)

    return handler


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    def delete(name: str) -> None:
        client.delete_instance(name, force=args.force)

    return _each(args, delete, "deleted")


# -- files ------------------------------------------------------------------------------------


def cmd_file_push(args: argparse.Namespace, client: Client) -> int:
    name, path = checks.split_remote(args.remote, "destination")
    mode = checks.parse_mode(args.mode) if args.mode is not None else None
    if args.local == "-":
        client.push_file(
            name, path, sys.stdin.buffer, mode=0o644 if mode is None else mode, parents=args.parents
        )
        return 0
    local = Path(args.local)
    try:
        f = local.open("rb")
    except OSError as exc:
        raise UsageError(
            f"cannot read {local}: {exc.strerror}", hint="check the local path"
        ) from exc
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{local} is not a regular file", hint="push one file at a time")
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)
        client.push_file(name, path, f, mode=mode, parents=args.parents)
    return 0


def cmd_file_pull(args: argparse.Namespace, client: Client) -> int:
    name, path = checks.split_remote(args.remote, "source")
    if args.local == "-":
        _, chunks = client.pull_file(name, path)
        sys.stdout.flush()
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return 0
    local = Path(args.local)
    if local.is_dir():
        local = local / Path(path).name
    if not local.parent.is_dir():
        raise UsageError(f"{local.parent} is not a directory", hint="create it first")
    mode, chunks = client.pull_file(name, path)
    # Written beside the target and renamed: a failed transfer never leaves half a file.
    tmp = local.with_name(f".{local.name}.vz-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, mode & 0o777)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 0


# -- images / host / daemon -------------------------------------------------------------------


def image_pairs(img: ImageInfo) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("name", img.name),
        ("kind", img.kind),
        ("digest", img.digest),
        ("kernel", img.kernel_release),
        ("size", format_size(img.size)),
        ("created", f"{img.created_at.isoformat()} ({age_since(img.created_at)} ago)"),
    ]
    pairs.extend((f"file {role}", p) for role, p in sorted(img.files.items()))
    return pairs


def cmd_image_list(args: argparse.Namespace, client: Client) -> int:
    images = client.list_images()
    if _json_mode(args):
        dump_models(images, _out())
        return 0
    rows = [
        (
            i.name,
            i.kind,
            i.kernel_release,
            format_size(i.size),
            age_since(i.created_at),
            i.digest.removeprefix("sha256:")[:12],
        )
        for i in sorted(images, key=lambda i: i.name)
    ]
    table(("NAME", "KIND", "KERNEL", "SIZE", "AGE", "DIGEST"), rows, _out())
    return 0


def cmd_image_info(args: argparse.Namespace, client: Client) -> int:
    img = client.get_image(checks.check_name(args.name, "image"))
    if _json_mode(args):
        _out().write(img.model_dump_json(indent=2) + "\n")
    else:
        key_values(image_pairs(img), _out())
    return 0


def cmd_image_build(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "image")
    progress = Progress(f"building image {name}")
    try:
        img = client.build_image(name, force=args.force, progress=progress)
    finally:
        progress.done()
    if _json_mode(args):
        _out().write(img.model_dump_json(indent=2) + "\n")
    else:
        _out().write(f"{img.name} {img.digest}\n")
    return 0


def cmd_image_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_image(checks.check_name(args.name, "image"))
    return 0


def cmd_host_info(args: argparse.Namespace, client: Client) -> int:
    info = client.host_info(refresh=args.refresh)
    if _json_mode(args):
        dump_json(info, _out())
    else:
        for key in ("memory_total", "memory_available"):
            if isinstance(info.get(key), int):
                info[key] = format_size(info[key])
        key_values(flatten(info), _out())
    return 0


def cmd_daemon_start(args: argparse.Namespace, client: Client) -> int:
    pid = client.server_info().get("pid") if client.is_running() else client.start_daemon()
    if _json_mode(args):
        dump_json({"running": True, "pid": pid}, _out())
    else:
        _out().write(f"{pid}\n")
    return 0


def cmd_daemon_stop(args: argparse.Namespace, client: Client) -> int:
    if not client.is_running():
        sys.stderr.write("vzd is not running\n")
        return 0
    client.shutdown_daemon(wait=True)
    return 0


def cmd_daemon_status(args: argparse.Namespace, client: Client) -> int:
    try:
        info = client.server_info()
    except DaemonUnavailable:
        if _json_mode(args):
            dump_json({"running": False}, _out())
        else:
            _out().write(f"not running (socket {client.socket_path})\n")
        return 3
    if _json_mode(args):
        dump_json({"running": True, **info}, _out())
    else:
        _out().write(
            f"running (pid {info.get('pid')}, version {info.get('server_version')}, "
            f"api {info.get('api_version')})\n"
        )
    return 0


_CONFIG_KEYS = {
    "limits.cpus": checks.check_cpus_text,
    "limits.memory": checks.check_memory,
    "limits.cpu_weight": checks.check_cpu_weight_text,
    "limits.cpu_pin": checks.parse_cpu_list,
    "limits.processes": checks.check_processes_text,
}


def cmd_config_show(args: argparse.Namespace, client: Client) -> int:
    inst = client.get_instance(checks.check_name(args.name))
    limits = inst.limits.model_dump(mode="json")
    if _json_mode(args):
        dump_json({"limits": limits}, _out())
    else:
        limits["memory"] = format_size(inst.limits.memory)
        key_values([(f"limits.{k}", v) for k, v in limits.items()], _out())
    return 0


def cmd_config_set(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    settings = checks.parse_settings(args.settings, _CONFIG_KEYS)
    limits = {key.removeprefix("limits."): value for key, value in settings.items()}
    inst = client.update_instance(name, {"limits": limits})
    if _json_mode(args):
        _out().write(inst.model_dump_json(indent=2) + "\n")
    return 0


_HANDLERS: dict[str, Handler] = {
    "run": cmd_run,
    "launch": cmd_launch,
    "list": cmd_list,
    "info": cmd_info,
    "exec": cmd_exec,
    "shell": cmd_shell,
    "console": cmd_console,
    "file.push": cmd_file_push,
    "file.pull": cmd_file_pull,
    "delete": cmd_delete,
    **netcmds.HANDLERS,
    **snapcmds.HANDLERS,
    **storecmds.HANDLERS,
    **obscmds.HANDLERS,
    **remotecmds.HANDLERS,
    "config.show": cmd_config_show,
    "config.set": cmd_config_set,
    "image.list": cmd_image_list,
    "image.info": cmd_image_info,
    "image.build": cmd_image_build,
    "image.delete": cmd_image_delete,
    "host.info": cmd_host_info,
    "daemon.start": cmd_daemon_start,
    "daemon.stop": cmd_daemon_stop,
    "daemon.status": cmd_daemon_status,
    **{a: _state_cmd(a) for a in ("start", "stop", "restart", "pause", "resume")},
}
