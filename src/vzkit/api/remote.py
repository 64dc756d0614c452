"""Remote access as the API, CLI and SDK see it: trust entries, join and bearer tokens."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictInt, ValidationError

from vzkit.api.base import Strict
from vzkit.api.instances import validate_name
from vzkit.errors import InvalidConfig

TrustName = Annotated[str, AfterValidator(lambda v: validate_name(v, "trust entry"))]


class TrustType(StrEnum):
    # A client certificate vzd issued against a one-time join token.
    CERTIFICATE = "certificate"
    # A bearer token sent as `Authorization: Bearer ...`.
    TOKEN = "token"


class TrustCreate(Strict):
    name: TrustName
    type: TrustType = TrustType.CERTIFICATE
    expires_in: StrictInt | None = Field(
        None,
        ge=60,
        le=10 * 365 * 86400,
        description="seconds until the join token (certificate) or bearer token (token) expires; "
        "default: a join token lasts a day, a bearer token does not expire",
    )


class TrustEntry(BaseModel):
    name: str
    type: TrustType
    # SHA-256 of the issued client certificate; None while a join token is unused.
    fingerprint: str | None = None
    pending: bool = Field(False, description="a join token not used yet")
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class TrustRecord(TrustEntry):
    """What the database keeps: the entry and the hash of its secret (never the secret)."""

    secret_hash: str | None = None

    def public(self) -> TrustEntry:
        return TrustEntry.model_validate(self.model_dump(exclude={"secret_hash"}))


class TrustCreated(BaseModel):
    entry: TrustEntry
    # Shown once: vzd keeps only its hash.
    token: str


class TrustJoin(Strict):
    token: str = Field(..., min_length=1, max_length=4096)
    csr: str = Field(..., min_length=1, max_length=16384, description="PEM certificate request")


class TrustJoined(BaseModel):
    certificate: str
    ca: str


class ServerInfo(BaseModel):
    """GET /1.0: the version probe. Lenient, unlike the resources' models: a client of any
    version must be able to read it (it decides whether the two can talk at all)."""

    api_version: str
    server_version: str
    auth: Literal["trusted", "untrusted"]
    caller: str | None = Field(None, description="Who vzd takes the caller for (trusted only)")
    pid: int | None = Field(None, description="vzd's process id (trusted only)")
    ca_certificate: str | None = Field(None, description="vzd's CA (PEM), over TLS only")


class ListenerInfo(Strict):
    """GET and PATCH /1.0/server: the TLS listener."""

    listen: str | None = Field(description="The configured address (None: off)")
    addresses: list[str] = Field(description="Where clients reach it, as join tokens list them")
    ca_fingerprint: str | None = Field(description="SHA-256 of vzd's CA while listening")
    from_environment: bool = Field(description="Set by VZ_LISTEN or --listen, not stored")


class ServerConfig(Strict):
    listen: str | None = Field(
        None,
        max_length=256,
        description="HOST:PORT for the TLS API ('' or null: off); e.g. ':8443' or '[::]:8443'",
    )


class JoinToken(Strict):
    """What a join token carries: enough for a client to reach and verify vzd, and the
    secret that lets it in once."""

    name: str
    fingerprint: str  # of vzd's CA
    addresses: list[str]
    secret: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(self.model_dump_json().encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            return cls.model_validate(json.loads(raw))
        except (binascii.Error, ValueError, ValidationError) as exc:
            raise InvalidConfig(
                "this is not a vzd join token",
                hint="make one on the server with: vz trust add NAME, and paste it whole",
            ) from exc
