"""Where vzkit keeps its files. One object, passed around; nothing else hard-codes a path.

Every directory can be moved with an environment variable so tests run in temporary
directories and several daemons can coexist. What a daemon makes outside its directories,
in places the whole host shares (links, nft tables, cgroups), carries its identity
(:attr:`Settings.daemon_id`), so that daemons never take or remove each other's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ID_RE = re.compile(r"[0-9a-f]{8}\Z")
# Written next to the identity when the state dir already held a database: the daemon ran
# before identities existed, so its older links and nft table may be claimed (once).
_LEGACY_MARK = "legacy"


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default))


def _env_number(name: str, default: str, parse: Callable[[str], float], least: float) -> Any:
    raw = os.environ.get(name, default)
    try:
        value = parse(raw)
    except ValueError:
        value = least - 1
    if not least <= value < float("inf"):  # nan and inf too
        from vzkit.errors import InvalidConfig

        raise InvalidConfig(
            f"invalid {name}={raw!r}",
            hint=f"give a number of the same kind as the default, {default!r}, "
            f"and {'above' if least else 'at least'} 0",
        )
    return value


def _env_size(name: str, default: str) -> int:
    # Imported here: the CLI builds Settings too and must not pay for `re` at start-up.
    from vzkit.api.bounds import parse_size

    return int(_env_number(name, default, parse_size, 0))


def _env_seconds(name: str, default: str) -> float:
    return float(_env_number(name, default, float, 1e-3))


def _env_count(name: str, default: str) -> int:
    return int(_env_number(name, default, int, 0))


def client_config_dir() -> Path:
    """The CLI's and SDK's own files (remotes): $VZ_CONFIG_DIR, else ~/.config/vzkit."""
    if env := os.environ.get("VZ_CONFIG_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vzkit"


def default_remote() -> str | None:
    """The remote the CLI talks to when none is named: $VZ_REMOTE, else the one chosen with
    `vz remote switch`; None for the local daemon. Kept here, away from the TLS code, so a
    plain `vz` call reads one small file and imports nothing more."""
    import json

    name = os.environ.get("VZ_REMOTE")
    if name is None:
        try:
            name = json.loads((client_config_dir() / "remotes.json").read_text()).get("current")
        except (OSError, ValueError, AttributeError):
            name = None
    return None if name in (None, "", "local") else str(name)


@dataclass(frozen=True)
class Settings:
    state_dir: Path = field(default_factory=lambda: _env_path("VZ_STATE_DIR", "/var/lib/vzkit"))
    runtime_dir: Path = field(default_factory=lambda: _env_path("VZ_RUNTIME_DIR", "/run/vzkit"))
    cache_dir: Path = field(default_factory=lambda: _env_path("VZ_CACHE_DIR", "/var/cache/vzkit"))
    # The directory that holds the guest kernel (vmlinuz-*) and its modules tree.
    kernel_dir: Path = field(default_factory=lambda: _env_path("VZ_KERNEL_DIR", "/boot"))
    modules_dir: Path = field(default_factory=lambda: _env_path("VZ_MODULES_DIR", "/lib/modules"))
    # Cgroup name under which every instance gets its own group.
    cgroup_parent: str = field(default_factory=lambda: os.environ.get("VZ_CGROUP_PARENT", "vzkit"))
    qemu_binary: str = field(
        default_factory=lambda: os.environ.get("VZ_QEMU", "qemu-system-x86_64")
    )
    # Total vCPUs / guest RAM of running instances may reach this many times the host's.
    cpu_overcommit: float = field(
        default_factory=lambda: float(os.environ.get("VZ_CPU_OVERCOMMIT", "4.0"))
    )
    memory_overcommit: float = field(
        default_factory=lambda: float(os.environ.get("VZ_MEMORY_OVERCOMMIT", "1.0"))
    )
    # Forced accelerator ("kvm" or "tcg"); None means probe.
    accel: str | None = field(default_factory=lambda: os.environ.get("VZ_ACCEL") or None)
    # The user QEMU runs as ("" or a missing user: root); scripts/setup creates vz-qemu.
    qemu_user: str = field(default_factory=lambda: os.environ.get("VZ_QEMU_USER", "vz-qemu"))
    # QEMU in its own mount namespace that shows it only its own files (off: debugging).
    jail: bool = field(default_factory=lambda: os.environ.get("VZ_JAIL", "1") != "0")
    # The network instances join when they name none; made on first use. "" or "none":
    # instances get no network unless they ask (the test suite's daemon outside netns).
    default_network: str | None = field(
        default_factory=lambda: (
            None
            if os.environ.get("VZ_DEFAULT_NETWORK", "vzbr0").lower() in ("", "none")
            else os.environ.get("VZ_DEFAULT_NETWORK", "vzbr0")
        )
    )

    # HOST:PORT for the TLS API; overrides the address stored with `vz daemon listen`.
    listen: str | None = field(default_factory=lambda: os.environ.get("VZ_LISTEN") or None)

    # -- request limits (server/limits.py; docs/api.md, "Limits") ---------------------------
    # Request bodies: most calls take small JSON, the join call less still; an import and a
    # file push are streamed to disk, each up to its own size, and never past the point
    # where less than min_free_disk would stay free in the state directory.
    max_body: int = field(default_factory=lambda: _env_size("VZ_MAX_BODY", "1MiB"))
    max_join_body: int = field(default_factory=lambda: _env_size("VZ_MAX_JOIN_BODY", "8KiB"))
    max_import_size: int = field(default_factory=lambda: _env_size("VZ_MAX_IMPORT_SIZE", "64GiB"))
    max_push_size: int = field(default_factory=lambda: _env_size("VZ_MAX_PUSH_SIZE", "4GiB"))
    min_free_disk: int = field(default_factory=lambda: _env_size("VZ_MIN_FREE_DISK", "1GiB"))
    # Seconds a client may take to send its request headers, and its body (a small body in
    # all; a streamed one between two chunks); WebSockets are exempt once upgraded.
    header_timeout: float = field(default_factory=lambda: _env_seconds("VZ_HEADER_TIMEOUT", "10"))
    body_timeout: float = field(default_factory=lambda: _env_seconds("VZ_BODY_TIMEOUT", "30"))
    tls_handshake_timeout: float = field(
        default_factory=lambda: _env_seconds("VZ_TLS_HANDSHAKE_TIMEOUT", "10")
    )
    # Open TLS connections per client address that have not authenticated (yet).
    max_anonymous_connections: int = field(
        default_factory=lambda: _env_count("VZ_MAX_ANON_CONNECTIONS", "16")
    )
    # Unauthenticated calls a minute per client address (0: no limit).
    join_rate: int = field(default_factory=lambda: _env_count("VZ_JOIN_RATE", "10"))
    probe_rate: int = field(default_factory=lambda: _env_count("VZ_PROBE_RATE", "60"))

    @functools.cached_property
    def daemon_id(self) -> str:
        """This daemon's identity: 8 hex digits made once and kept in ``<state_dir>/daemon-id``,
        so it is stable across restarts and differs between daemons (state dirs)."""
        return _load_identity(self.state_dir)[0]

    @property
    def predates_identity(self) -> bool:
        """Whether this state dir was used by a daemon from before identities."""
        return _load_identity(self.state_dir)[1]

    @property
    def daemon_cgroup(self) -> str:
        """The cgroup all of this daemon's instances live under: two daemons on one kernel
        may have instances of the same name."""
        return f"{self.cgroup_parent}/{self.daemon_id}"

    def instance_cgroup(self, name: str) -> str:
        return f"{self.daemon_cgroup}/{name}"

    @property
    def socket_path(self) -> Path:
        return Path(os.environ.get("VZ_SOCKET", str(self.runtime_dir / "vzd.sock")))

    @property
    def db_path(self) -> Path:
        return self.state_dir / "vzkit.db"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def instance_runtime_dir(self) -> Path:
        return self.runtime_dir / "instances"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "vzd.log"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "vzd.pid"


def _load_identity(state_dir: Path) -> tuple[str, bool]:
    """(id, made for a state dir from before identities), creating it on first use."""
    path = state_dir / "daemon-id"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        legacy = (state_dir / "vzkit.db").exists()
        tmp = path.with_name(f".daemon-id.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(4) + (f" {_LEGACY_MARK}" if legacy else "") + "\n")
        try:
            # link() does not replace: of two processes starting at once, one id wins.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    fields = path.read_text().split()
    if not fields or not _ID_RE.match(fields[0]):
        from vzkit.errors import InvalidConfig

        raise InvalidConfig(
            f"{path} does not hold a daemon identity (8 hex digits)",
            hint="restore it from a backup; deleting it makes the daemon a stranger to "
            "its own bridges and nft tables",
        )
    return fields[0], _LEGACY_MARK in fields[1:]
