"""The trust store, vzd's CA and the listen-address parser, against a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from vzkit.api.remote import JoinToken, TrustCreate, TrustJoin, TrustType
from vzkit.errors import Conflict, Forbidden, InvalidConfig, NotFound
from vzkit.pki import ensure_server_cert, fingerprint, load_or_create_ca, make_csr, new_key
from vzkit.server.db import Database
from vzkit.server.remote import parse_listen
from vzkit.server.trust import TrustStore
from vzkit.settings import default_remote


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    ca = load_or_create_ca(tmp_path / "pki")
    return TrustStore(Database(tmp_path / "db"), lambda: ca)


def test_join_once_then_known_by_fingerprint(store: TrustStore, tmp_path: Path) -> None:
    made = store.add(TrustCreate(name="laptop"), ["127.0.0.1:8443"])
    token = JoinToken.decode(made.token)
    assert token.addresses == ["127.0.0.1:8443"] and made.entry.pending
    assert made.entry.expires_at is not None
    csr = make_csr(new_key(), "asks-for-another-name").decode()
    joined = store.join(TrustJoin(token=made.token, csr=csr))
    cert = x509.load_pem_x509_certificate(joined.certificate.encode())
    # The subject is the entry's name whatever the request asked for.
    assert cert.subject.rfc4514_string() == "CN=laptop"
    rec = store.by_certificate(fingerprint(cert))
    assert rec is not None and rec.name == "laptop"
    with pytest.raises(Forbidden):
        store.join(TrustJoin(token=made.token, csr=csr))
    # Entries survive a restart (a new store on the same database); secrets are hashed.
    again = TrustStore(Database(tmp_path / "db"), lambda: load_or_create_ca(tmp_path / "pki"))
    assert again.by_certificate(fingerprint(cert)) is not None
    assert made.token not in (tmp_path / "db").read_bytes().decode("latin-1")
    again.remove("laptop")
    assert again.by_certificate(fingerprint(cert)) is None
    with pytest.raises(NotFound):
        again.remove("laptop")


def test_wrong_secret_expired_and_bad_requests(store: TrustStore) -> None:
    made = store.add(TrustCreate(name="a"), ["h:1"])
    forged = JoinToken.decode(made.token).model_copy(update={"secret": "guess"}).encode()
    csr = make_csr(new_key(), "a").decode()
    with pytest.raises(Forbidden):
        store.join(TrustJoin(token=forged, csr=csr))
    with pytest.raises(InvalidConfig, match="not a vzd join token"):
        store.join(TrustJoin(token="garbage", csr=csr))
    with pytest.raises(InvalidConfig, match="signing request"):
        store.join(TrustJoin(token=made.token, csr="-----BEGIN CERTIFICATE REQUEST-----"))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidConfig, match="1024 bits"):
        store.join(TrustJoin(token=made.token, csr=make_csr(weak, "a").decode()))
    with pytest.raises(Conflict):
        store.add(TrustCreate(name="a"), [])
    # Expired: the record's clock is moved back, as time would.
    rec = store._records["a"]
    store._records["a"] = rec.model_copy(
        update={"expires_at": datetime.now(UTC) - timedelta(seconds=1)}
    )
    with pytest.raises(Forbidden):
        store.join(TrustJoin(token=made.token, csr=csr))


def test_bearer_tokens(store: TrustStore) -> None:
    made = store.add(TrustCreate(name="ci", type=TrustType.TOKEN, expires_in=3600), [])
    assert made.token.startswith("vzt_")
    assert store.by_token(made.token) is not None
    assert store.by_token(made.token + "x") is None
    rec = store._records["ci"]
    store._records["ci"] = rec.model_copy(
        update={"expires_at": datetime.now(UTC) - timedelta(seconds=1)}
    )
    assert store.by_token(made.token) is None
    with pytest.raises(ValueError):
        TrustCreate(name="x", expires_in=5)  # under a minute
    with pytest.raises(ValueError):
        TrustCreate(name="Bad Name")


def test_server_certificate_reissued_for_new_names(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    crt, _ = ensure_server_cert(tmp_path, ca, ["localhost"], ["127.0.0.1"])
    first = crt.read_bytes()
    assert ensure_server_cert(tmp_path, ca, ["localhost"], ["127.0.0.1"])[0].read_bytes() == first
    ensure_server_cert(tmp_path, ca, ["localhost"], ["127.0.0.1", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.1.2.3" in {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    # The same CA comes back from disk.
    assert load_or_create_ca(tmp_path).fingerprint == ca.fingerprint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8443", ("::", 8443)),
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:9000", ("::1", 9000)),
        ("*:1", ("::", 1)),
        ("host-a.lan:443", ("host-a.lan", 443)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8443", "127.0.0.1", "h:0", "h:70000", "a b:80", "h:x"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(InvalidConfig, match="listen address"):
        parse_listen(text)


def test_default_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZ_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("VZ_REMOTE", raising=False)
    assert default_remote() is None
    (tmp_path / "remotes.json").write_text('{"current": "lab"}')
    assert default_remote() == "lab"
    monkeypatch.setenv("VZ_REMOTE", "local")
    assert default_remote() is None
    (tmp_path / "remotes.json").write_text("[not json")
    monkeypatch.delenv("VZ_REMOTE")
    assert default_remote() is None
