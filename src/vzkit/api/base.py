"""The one base of every wire model: strict, so a typo in a request is an error, not a no-op."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
