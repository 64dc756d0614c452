"""Remote access: vzd's TLS API on loopback, join tokens, client certificates, bearer
tokens, revocation, and what an unauthenticated caller gets (the version probe only)."""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Daemon
from vzkit.errors import DaemonUnavailable, Forbidden, InvalidConfig, Unauthorized
from vzkit.pki import cert_pem, key_pem, load_or_create_ca, new_key
from vzkit.sdk.client import Client
from vzkit.sdk.remotes import Remote, RemoteConfig

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls(private_daemon: Daemon, tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    """A daemon listening on 127.0.0.1 (set live through the unix socket), and a client
    config directory of the test's own."""
    d = private_daemon
    d.start()
    address = f"127.0.0.1:{_free_port()}"
    d.client().set_listen(address)
    d.env["VZ_CONFIG_DIR"] = str(tmp_path / "client")
    yield d, address


def _https(d: Daemon, address: str, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(d.settings.state_dir / "pki" / "ca.crt"))
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request(method, path, **kw)  # type: ignore[arg-type]
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _audit(d: Daemon) -> list[dict[str, object]]:
    lines = (d.settings.state_dir / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_without_credentials_only_the_version_probe(tls: tuple[Daemon, str]) -> None:
    d, address = tls
    status, body = _https(d, address, "GET", "/1.0")
    info = json.loads(body)
    assert status == 200 and info["auth"] == "untrusted" and "pid" not in info
    assert info["ca_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    for method, path in [
        ("GET", "/1.0/instances"),
        ("GET", "/1.0/host"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/1.0/trust"),
        ("POST", "/1.0/instances"),
        ("POST", "/1.0/daemon/shutdown"),
    ]:
        status, body = _https(d, address, method, path)
        err = json.loads(body)
        assert status == 401 and err["code"] == "unauthorized", (method, path)
        assert "vz remote add" in err["hint"]
    # Headers cannot make a network caller look local, nor borrow another peer's address.
    for forged in (
        {"X-Forwarded-Proto": "http"},
        {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1;proto=http"},
    ):
        status, body = _https(d, address, "GET", "/1.0/instances", headers=forged)
        assert status == 401, (forged, body)
    # WebSockets too (events, exec).
    ctx = ssl.create_default_context(cafile=str(d.settings.state_dir / "pki" / "ca.crt"))
    with pytest.raises(InvalidStatus) as exc:
        connect(f"wss://{address}/1.0/events", ssl=ctx, open_timeout=10)
    assert exc.value.response.status_code == 401
    # A refused mutating call is audited, with who tried.
    refused = [a for a in _audit(d) if a["path"] == "/1.0/daemon/shutdown"]
    assert refused and refused[-1]["caller"] == "anonymous" and refused[-1]["status"] == 401
    assert d.client().server_info().auth == "trusted"  # the local socket is unaffected


def test_join_token_issues_a_certificate_that_works_until_removed(
    tls: tuple[Daemon, str], tmp_path: Path
) -> None:
    d, _ = tls
    r = d.vz("trust", "add", "laptop")
    assert r.returncode == 0, r.stderr
    token = r.stdout.decode().splitlines()[1]
    r = d.vz("remote", "add", "lab", token)
    assert r.returncode == 0, r.stderr
    rdir = tmp_path / "client" / "remotes" / "lab"
    assert (rdir / "client.key").stat().st_mode & 0o777 == 0o600
    # The token is single-use.
    r = d.vz("remote", "add", "lab2", token)
    assert r.returncode == 1 and b"not valid" in r.stderr
    assert not (tmp_path / "client" / "remotes" / "lab2").exists()

    # Everything works over TLS: REST, the exec WebSocket, file upload, events.
    r = d.vz("--remote", "lab", "launch", "minimal", "far", "--type", "container")
    assert r.returncode == 0, r.stderr
    r = d.vz("--remote", "lab", "exec", "far", "--", "sh", "-c", "echo over tls; exit 3")
    assert (r.returncode, r.stdout) == (3, b"over tls\n"), r.stderr
    r = d.vz("--remote", "lab", "file", "push", "-", "far:/tmp/x", input=b"payload")
    assert r.returncode == 0, r.stderr
    r = d.vz("--remote", "lab", "exec", "far", "--", "cat", "/tmp/x")
    assert r.stdout == b"payload", r.stderr
    r = d.vz("--remote", "lab", "--format", "json", "list")
    assert [i["name"] for i in json.loads(r.stdout)] == ["far"]
    # `vz remote switch` makes it the default.
    assert d.vz("remote", "switch", "lab").returncode == 0
    r = d.vz("--format", "json", "daemon", "status")
    assert json.loads(r.stdout)["caller"] == "certificate:laptop", r.stderr
    assert d.vz("remote", "switch", "local").returncode == 0

    entries = {e.name: e for e in d.client().list_trust()}
    assert not entries["laptop"].pending and entries["laptop"].fingerprint
    created = [a for a in _audit(d) if a["method"] == "POST" and a["path"] == "/1.0/instances"]
    assert created[-1]["caller"] == "certificate:laptop"

    # Revoked: the very next call is refused, although the CA signed the certificate.
    assert d.vz("trust", "remove", "laptop").returncode == 0
    r = d.vz("--remote", "lab", "list")
    assert r.returncode == 1 and b"no longer trusted" in r.stderr
    with pytest.raises(Forbidden):
        Client(remote=_load(tmp_path, "lab")).list_instances()
    d.client().delete_instance("far", force=True)


def _load(tmp_path: Path, name: str) -> Remote:
    old = os.environ.get("VZ_CONFIG_DIR")
    os.environ["VZ_CONFIG_DIR"] = str(tmp_path / "client")
    try:
        remote = RemoteConfig.load().get(name)
    finally:
        if old is None:
            del os.environ["VZ_CONFIG_DIR"]
        else:
            os.environ["VZ_CONFIG_DIR"] = old
    assert remote is not None
    return remote


def test_bearer_token_and_pinned_fingerprint(tls: tuple[Daemon, str], tmp_path: Path) -> None:
    d, address = tls
    created = d.client().add_trust("ci", "token")
    fp = d.client().server_config().ca_fingerprint
    assert fp is not None
    # Plain HTTPS with the header, as curl would.
    hdr = {"Authorization": f"Bearer {created.token}"}
    status, body = _https(d, address, "GET", "/1.0/instances", headers=hdr)
    assert (status, json.loads(body)) == (200, [])
    status, body = _https(
        d, address, "GET", "/1.0/instances", headers={"Authorization": "Bearer x"}
    )
    assert status == 401 and json.loads(body)["code"] == "unauthorized"

    # The CLI will not trust an unchecked CA...
    r = d.vz("remote", "add", "ci", address, "--token", created.token)
    assert r.returncode == 1 and fp.encode() in r.stderr and b"--fingerprint" in r.stderr
    r = d.vz("remote", "add", "ci", address, "--token", created.token, "--fingerprint", "ab" * 32)
    assert r.returncode == 1 and b"in the middle" in r.stderr
    assert not (tmp_path / "client" / "remotes" / "ci").exists()
    # ...but one whose fingerprint was given.
    r = d.vz("remote", "add", "ci", address, "--token", created.token, "--fingerprint", fp)
    assert r.returncode == 0, r.stderr
    r = d.vz("--remote", "ci", "--format", "json", "daemon", "status")
    assert json.loads(r.stdout)["caller"] == "token:ci"
    d.client().remove_trust("ci")
    with pytest.raises(Unauthorized):
        Client(remote=_load(tmp_path, "ci")).list_instances()


def _foreign_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate from a CA vzd never heard of."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    crt, k = tmp_path / "intruder.crt", tmp_path / "intruder.key"
    crt.write_bytes(cert_pem(cert))
    k.write_bytes(key_pem(key))
    return crt, k


def test_foreign_certificate_and_forged_token_are_refused(
    tls: tuple[Daemon, str], tmp_path: Path
) -> None:
    d, address = tls
    crt, key = _foreign_cert(tmp_path)
    ctx = ssl.create_default_context(cafile=str(d.settings.state_dir / "pki" / "ca.crt"))
    ctx.load_cert_chain(str(crt), str(key))
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    # The handshake itself fails: vzd asks for certificates signed by its own CA only.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        conn.request("GET", "/1.0/instances")
        conn.getresponse().read()
    conn.close()

    # A join token whose CA fingerprint is not the server's: refused before any secret is
    # sent, and nothing is left in the client's config.
    token = d.client().add_trust("victim").token
    raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw["fingerprint"] = "00" * 32
    forged = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()
    r = d.vz("remote", "add", "evil", forged)
    assert r.returncode == 1 and b"another CA" in r.stderr
    assert not (tmp_path / "client" / "remotes" / "evil").exists()
    assert d.client().list_trust()[0].pending  # the real token is still unused
    r = d.vz("remote", "add", "bad", "not-a-token")
    assert r.returncode == 1 and b"not a vzd join token" in r.stderr


def test_listen_address_bad_input_live_change_and_restart(tls: tuple[Daemon, str]) -> None:
    d, address = tls
    for bad in ("bogus", "127.0.0.1:0", "127.0.0.1:99999", "300.1.1.1:80"):
        r = d.vz("daemon", "listen", bad)
        assert r.returncode == 1 and b"error:" in r.stderr, bad
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = d.vz("daemon", "listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert r.returncode == 1 and b"in use" in r.stderr
    # After each refusal the old listener still answers.
    assert _https(d, address, "GET", "/1.0")[0] == 200
    assert d.client().server_config().listen == address

    # The address survives a restart of vzd.
    d.stop()
    d.start()
    assert _https(d, address, "GET", "/1.0")[0] == 200

    moved = f"127.0.0.1:{_free_port()}"
    r = d.vz("daemon", "listen", moved)
    assert r.returncode == 0, r.stderr
    assert _https(d, moved, "GET", "/1.0")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        _https(d, address, "GET", "/1.0")
    assert d.vz("daemon", "listen", "off").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        _https(d, moved, "GET", "/1.0")
    # Join tokens need an address to put in them.
    r = d.vz("trust", "add", "nowhere")
    assert r.returncode == 1 and b"vz daemon listen" in r.stderr


def test_unreachable_or_damaged_remote_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "r"
    load_or_create_ca(d)
    remote = Remote("gone", [f"127.0.0.1:{_free_port()}"], "token", "00", d)
    with pytest.raises(DaemonUnavailable) as exc:
        Client(remote=remote).list_instances()
    assert "'gone'" in exc.value.message and exc.value.hint
    (d / "ca.crt").write_text("garbage")
    with pytest.raises(InvalidConfig) as exc2:
        Client(remote=remote).list_instances()
    assert "vz remote remove gone" in (exc2.value.hint or "")
