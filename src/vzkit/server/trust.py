"""Who may use vzd from the network: the trust store.

Every entry is either a client certificate vzd issued (found by its fingerprint on each
TLS connection, so removing the entry locks the certificate out at once, although the CA
still signs it) or a bearer token. Secrets are kept only as SHA-256 hashes; the join token
and the bearer token are shown once, when made. Entries are cached in memory: the check
runs on every remote request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from vzkit.api.remote import (
    JoinToken,
    TrustCreate,
    TrustCreated,
    TrustEntry,
    TrustJoin,
    TrustJoined,
    TrustRecord,
    TrustType,
)
from vzkit.errors import Conflict, Forbidden, NotFound
from vzkit.pki import CertAuthority, cert_pem, fingerprint
from vzkit.server.db import Database

JOIN_TOKEN_LIFETIME = timedelta(days=1)
BEARER_PREFIX = "vzt_"
# last_used_at is written at most this often per entry: the check must not write each time.
_USE_RECORD_INTERVAL = 60.0


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _expired(rec: TrustRecord) -> bool:
    return rec.expires_at is not None and rec.expires_at <= _now()


class TrustStore:
    def __init__(self, db: Database, ca: Callable[[], CertAuthority]) -> None:
        self._db = db
        # The CA is made on first need (it costs the cryptography import).
        self._ca = ca
        self._records = {
            r.name: r for r in (TrustRecord.model_validate_json(d) for d in db.trust_rows())
        }
        self._used: dict[str, float] = {}

    def entries(self) -> list[TrustEntry]:
        return [self._records[n].public() for n in sorted(self._records)]

    def _save(self, rec: TrustRecord) -> None:
        self._db.put_trust(rec.name, rec.model_dump_json())
        self._records[rec.name] = rec

    def add(self, req: TrustCreate, addresses: list[str]) -> TrustCreated:
        if req.name in self._records:
            raise Conflict(
                f"a trust entry named {req.name!r} already exists",
                hint=f"choose another name, or remove it first: vz trust remove {req.name}",
            )
        now = _now()
        if req.type is TrustType.TOKEN:
            token = BEARER_PREFIX + secrets.token_urlsafe(32)
            lifetime = timedelta(seconds=req.expires_in) if req.expires_in else None
        else:
            secret = secrets.token_urlsafe(32)
            token = JoinToken(
                name=req.name,
                fingerprint=self._ca().fingerprint,
                addresses=addresses,
                secret=secret,
            ).encode()
            lifetime = timedelta(seconds=req.expires_in) if req.expires_in else JOIN_TOKEN_LIFETIME
        rec = TrustRecord(
            name=req.name,
            type=req.type,
            pending=req.type is TrustType.CERTIFICATE,
            created_at=now,
            expires_at=now + lifetime if lifetime else None,
            secret_hash=_hash(secret if req.type is TrustType.CERTIFICATE else token),
        )
        self._save(rec)
        return TrustCreated(entry=rec.public(), token=token)

    def remove(self, name: str) -> None:
        if name not in self._records:
            raise NotFound(f"no trust entry named {name!r}", hint="list them: vz trust list")
        self._db.delete_trust(name)
        del self._records[name]
        self._used.pop(name, None)

    def join(self, req: TrustJoin) -> TrustJoined:
        """Trade an unused join token and a CSR for a client certificate."""
        token = JoinToken.decode(req.token)
        rec = self._records.get(token.name)
        denied = Forbidden(
            "this join token is not valid (used already, expired, or removed)",
            hint="ask for a new one; on the server: vz trust add NAME",
        )
        if rec is None or not rec.pending or rec.secret_hash is None:
            raise denied
        if not hmac.compare_digest(rec.secret_hash, _hash(token.secret)):
            raise denied
        if _expired(rec):
            raise denied
        ca = self._ca()
        cert = ca.issue_client(req.csr, rec.name)
        now = _now()
        self._save(
            rec.model_copy(
                update={
                    "pending": False,
                    "fingerprint": fingerprint(cert),
                    "secret_hash": None,
                    "expires_at": None,
                    "last_used_at": now,
                }
            )
        )
        return TrustJoined(certificate=cert_pem(cert).decode(), ca=cert_pem(ca.cert).decode())

    # -- checks (every remote request) ----------------------------------------------------

    def by_certificate(self, fp: str) -> TrustRecord | None:
        for rec in self._records.values():
            if rec.fingerprint is not None and hmac.compare_digest(rec.fingerprint, fp):
                return self._use(rec)
        return None

    def by_token(self, token: str) -> TrustRecord | None:
        h = _hash(token)
        for rec in self._records.values():
            if (
                rec.type is TrustType.TOKEN
                and rec.secret_hash is not None
                and hmac.compare_digest(rec.secret_hash, h)
            ):
                return None if _expired(rec) else self._use(rec)
        return None

    def _use(self, rec: TrustRecord) -> TrustRecord:
        now = time.monotonic()
        if now - self._used.get(rec.name, -_USE_RECORD_INTERVAL) >= _USE_RECORD_INTERVAL:
            self._used[rec.name] = now
            self._save(rec.model_copy(update={"last_used_at": _now()}))
        return rec
