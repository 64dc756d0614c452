"""The client's side of remote access: the remotes it knows and how it reaches them.

``$VZ_CONFIG_DIR`` (default ``~/.config/vzkit``) holds ``remotes.json`` (addresses, which
remote is the default) and per remote a directory with vzd's CA certificate and either the
client certificate vzd issued (its key made here, mode 0600) or the bearer token. Read on
every `vz` call, so only the standard library is imported at load time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from vzkit.errors import Conflict, DaemonUnavailable, InvalidConfig, NotFound, VzError
from vzkit.sdk._api import error_from_response
from vzkit.settings import client_config_dir

LOCAL = "local"
_TIMEOUT = 10.0
_NAME_HINT = "use lower-case letters, digits and dashes"


@dataclass
class Remote:
    name: str
    # HOST:PORT, tried in order (a join token lists every address of the server).
    addresses: list[str]
    auth: str  # "certificate" or "token"
    ca_fingerprint: str
    directory: Path = field(repr=False, default=Path())

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.directory / "client.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "client.key"

    @cached_property
    def token(self) -> str | None:
        # Read once: headers() runs on every request.
        p = self.directory / "token"
        return p.read_text().strip() if self.auth == "token" and p.exists() else None

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts vzd's own CA only; presents the issued client certificate, if any."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            if self.auth == "certificate":
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidConfig(
                f"cannot load remote {self.name!r}'s certificates from {self.directory}: {exc}",
                hint=f"add it again: vz remote remove {self.name}; vz remote add {self.name} ...",
            ) from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def headers(self) -> dict[str, str]:
        token = self.token
        return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class RemoteConfig:
    current: str = LOCAL
    remotes: dict[str, Remote] = field(default_factory=dict)
    directory: Path = field(default_factory=client_config_dir)

    @classmethod
    def load(cls) -> RemoteConfig:
        d = client_config_dir()
        try:
            raw = json.loads((d / "remotes.json").read_text())
        except FileNotFoundError:
            return cls(directory=d)
        except (OSError, ValueError) as exc:
            raise InvalidConfig(
                f"cannot read {d / 'remotes.json'}: {exc}",
                hint="fix or remove the file (vz remote add re-creates it)",
            ) from exc
        remotes = {
            n: Remote(name=n, directory=d / "remotes" / n, **r)
            for n, r in raw.get("remotes", {}).items()
        }
        return cls(current=raw.get("current", LOCAL), remotes=remotes, directory=d)

    def save(self) -> None:
        data = {
            "current": self.current,
            "remotes": {
                n: {k: v for k, v in asdict(r).items() if k not in ("name", "directory")}
                for n, r in sorted(self.remotes.items())
            },
        }
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.directory / ".remotes.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.directory / "remotes.json")

    def get(self, name: str) -> Remote | None:
        """The remote called ``name`` (None for the local daemon)."""
        if name == LOCAL:
            return None
        if name not in self.remotes:
            raise NotFound(
                f"no remote named {name!r}",
                hint="list them with: vz remote list; add one with: vz remote add NAME TOKEN",
            )
        return self.remotes[name]

    @contextmanager
    def _adding(self, name: str) -> Iterator[Path]:
        """A fresh directory for remote ``name``, gone again if adding it fails."""
        d = self._new(name)
        try:
            yield d
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def _register(self, remote: Remote) -> Remote:
        self.remotes[remote.name] = remote
        self.save()
        return remote

    def _new(self, name: str) -> Path:
        from vzkit.api.bounds import NAME_RE

        if name == LOCAL or not NAME_RE.match(name):
            raise InvalidConfig(f"invalid remote name {name!r}", hint=_NAME_HINT)
        if name in self.remotes:
            raise Conflict(
                f"a remote named {name!r} exists already",
                hint=f"remove it first: vz remote remove {name}",
            )
        d = self.directory / "remotes" / name
        shutil.rmtree(d, ignore_errors=True)  # a half-made one from an interrupted add
        # Private all the way down: it holds keys and tokens.
        for p in (self.directory, d.parent, d):
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    def add_with_join_token(self, name: str, token_text: str) -> Remote:
        """Join: verify the server against the token's CA fingerprint, then trade the
        token and a CSR (the key never leaves this host) for a client certificate."""
        from vzkit.api.remote import JoinToken
        from vzkit.pki import key_pem, make_csr, new_key, write_private

        token = JoinToken.decode(token_text)
        with self._adding(name) as d:
            address, ca_pem = _find_server(token.addresses, token.fingerprint)
            (d / "ca.crt").write_text(ca_pem)
            remote = Remote(name, [address], "certificate", token.fingerprint, d)
            key = new_key()
            body = {"token": token_text.strip(), "csr": make_csr(key, token.name).decode()}
            ctx = ssl.create_default_context(cafile=str(remote.ca_file))
            joined = _request(address, ctx, "POST", "/1.0/trust/join", body)
            write_private(remote.key_file, key_pem(key))
            write_private(remote.cert_file, joined["certificate"].encode())
            remote.addresses = [address, *(a for a in token.addresses if a != address)]
            _check_trusted(remote)
        return self._register(remote)

    def add_with_bearer(
        self, name: str, address: str, token: str, fingerprint: str | None, accept: bool
    ) -> Remote:
        address = _strip_scheme(address)
        with self._adding(name) as d:
            ca_pem = _probe_ca(address)
            fp = _fingerprint_pem(ca_pem)
            if fingerprint is not None and fingerprint.lower().replace(":", "") != fp:
                raise VzError(
                    f"{address} presents CA fingerprint {fp}, not the one given",
                    hint="someone may be in the middle: check the address and the fingerprint "
                    "(on the server: vz daemon listen)",
                )
            if fingerprint is None and not accept:
                raise InvalidConfig(
                    f"{address}'s CA certificate has fingerprint {fp}; not trusted yet",
                    hint="compare it with `vz daemon listen` on the server, then re-run with "
                    f"--fingerprint {fp}",
                )
            (d / "ca.crt").write_text(ca_pem)
            from vzkit.pki import write_private

            write_private(d / "token", token.strip().encode())
            remote = Remote(name, [address], "token", fp, d)
            _check_trusted(remote)
        return self._register(remote)

    def remove(self, name: str) -> None:
        self.get(name)
        del self.remotes[name]
        if self.current == name:
            self.current = LOCAL
        shutil.rmtree(self.directory / "remotes" / name, ignore_errors=True)
        self.save()

    def switch(self, name: str) -> None:
        self.get(name)
        self.current = name
        self.save()


def _strip_scheme(address: str) -> str:
    address = address.strip().removeprefix("https://").rstrip("/")
    if ":" not in address.rpartition("]")[2]:
        address += ":8443"
    return address


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise InvalidConfig(f"invalid remote address {address!r}", hint="give HOST:PORT")
    return host.strip("[]"), int(port)


def _fingerprint_pem(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _request(
    address: str,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Any:
    host, port = split_address(address)
    conn = http.client.HTTPSConnection(host, port, timeout=_TIMEOUT, context=ctx)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLCertVerificationError as exc:
            raise VzError(
                f"{address} presented a certificate vzd's CA did not sign: {exc.verify_message}",
                hint="someone may be in the middle, or the server was reinstalled: "
                "ask for a new token",
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(
                f"cannot reach vzd at {address}: {exc}",
                hint="check the address and that the server listens: vz daemon listen",
            ) from exc
        if resp.status >= 400:
            raise error_from_response(resp.status, raw)
        return json.loads(raw) if raw else None
    finally:
        conn.close()


def _probe_ca(address: str) -> str:
    """vzd's CA certificate as the server at ``address`` says it is (not verified yet)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    info = _request(address, ctx, "GET", "/1.0")
    pem = info.get("ca_certificate") if isinstance(info, dict) else None
    if not isinstance(pem, str):
        raise VzError(f"{address} does not look like vzd (no CA certificate in its answer)")
    return pem


def _find_server(addresses: list[str], fingerprint: str) -> tuple[str, str]:
    """The first address whose server has the CA the token names, and that CA."""
    errors = []
    for address in addresses:
        try:
            pem = _probe_ca(address)
        except VzError as exc:
            errors.append(exc.message)
            continue
        if _fingerprint_pem(pem) == fingerprint:
            return address, pem
        errors.append(f"{address} has another CA than the token names")
    raise DaemonUnavailable(
        "no address in the join token reaches the vzd that made it: " + "; ".join(errors),
        hint="check that the server listens (vz daemon listen) and is reachable from here",
    )


def _check_trusted(remote: Remote) -> None:
    info = _request(
        remote.addresses[0], remote.ssl_context(), "GET", "/1.0", None, remote.headers()
    )
    if not isinstance(info, dict) or info.get("auth") != "trusted":
        raise VzError(
            f"vzd at {remote.addresses[0]} did not accept the credentials",
            hint="ask for a new token: vz trust add NAME (on the server)",
        )


def connect_tls(remote: Remote, timeout: float | None) -> tuple[socket.socket, str]:
    """A TLS connection to the first address of ``remote`` that answers, and its address."""
    ctx = remote.ssl_context()
    errors = []
    for address in remote.addresses:
        host, port = split_address(address)
        # Connecting and the handshake get a short limit of their own; the long one (vzd
        # may take minutes to answer a boot) is for the requests.
        short = _TIMEOUT if timeout is None else min(timeout, _TIMEOUT)
        try:
            raw = socket.create_connection((host, port), timeout=short)
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
            continue
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
            tls.settimeout(timeout)
            return tls, address
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise VzError(
                f"remote {remote.name!r} at {address} presented a certificate its CA did not "
                f"sign: {exc.verify_message}",
                hint="someone may be in the middle, or the server was reinstalled: "
                f"vz remote remove {remote.name}, then add it again",
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            errors.append(f"{address}: {exc}")
    raise DaemonUnavailable(
        f"cannot reach remote {remote.name!r}: " + "; ".join(errors),
        hint="check the network, and that the server listens: vz daemon listen",
    )
