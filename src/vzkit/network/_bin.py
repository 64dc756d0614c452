"""Locate the helper binaries (nft, dnsmasq): they live in sbin, often not on a user's PATH."""

from __future__ import annotations

import os
import shutil

from vzkit.errors import HostUnsupported

_PACKAGES = {"nft": "nftables", "dnsmasq": "dnsmasq-base"}


def find(name: str) -> str:
    path = shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )
    if path is None:
        raise HostUnsupported(
            f"{name} is not installed",
            hint=f"apt-get install {_PACKAGES.get(name, name)} (or run scripts/setup)",
        )
    return path
