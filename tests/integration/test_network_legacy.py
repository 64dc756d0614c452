"""A state dir from before daemon identities: the daemon claims its own old links and drops
its old ``inet vzkit`` table once, and only what is provably its own. The network manager
runs against a namespace of the test's own."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from tests.integration.netns import in_ns, namespace
from vzkit.api.networks import NetworkConfig
from vzkit.errors import Conflict
from vzkit.network import links
from vzkit.network._netns import entered
from vzkit.network.manager import NetworkManager
from vzkit.server.db import Database
from vzkit.settings import Settings

pytestmark = pytest.mark.integration

LAB = NetworkConfig.model_validate({"name": "lab", "subnet": "10.86.0.0/24", "bridge": "vzbr5"})


def _old_table(bridges: list[str]) -> str:
    rules = "".join(f'\t\tiifname "{b}" oifname "{b}" accept\n' for b in bridges)
    return (
        "table inet vzkit {\n\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{rules}\t}}\n}}\n"
    )


def _nft(ns: str, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True
    )


def _old_bridge(ns: str, name: str, alias: str) -> None:
    in_ns(ns, "ip", "link", "add", name, "type", "bridge")
    in_ns(ns, "ip", "link", "set", name, "alias", alias)


@pytest.fixture
def old_host(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """A namespace with a pre-identity daemon's bridge vzbr5 (network lab) and another
    pre-identity daemon's vzbr6, and a state dir whose database predates identities."""
    with namespace(f"vzl-{uuid.uuid4().hex[:8]}") as ns:
        state = tmp_path / "state"
        db = Database(state / "vzkit.db")
        db.insert_network(LAB.name, LAB.model_dump_json())
        db.close()
        _old_bridge(ns, "vzbr5", "vzkit:lab")
        _old_bridge(ns, "vzbr6", "vzkit:other")
        # dnsmasq goes with the namespace (namespace() kills what runs in it).
        yield ns, Settings(state_dir=state, runtime_dir=tmp_path / "run")


def _start(ns: str, settings: Settings) -> NetworkManager:
    with entered(ns):
        m = NetworkManager(settings, Database(settings.db_path))
        m.reconcile()
    return m


def _alias(ns: str, name: str) -> str:
    return str(json.loads(in_ns(ns, "ip", "-j", "link", "show", name))[0].get("ifalias", ""))


def test_old_table_and_links_of_this_state_dir_are_claimed(
    old_host: tuple[str, Settings],
) -> None:
    ns, settings = old_host
    _nft(ns, _old_table(["vzbr5"]))
    assert settings.predates_identity
    m = _start(ns, settings)
    me = settings.daemon_id
    assert _alias(ns, "vzbr5") == f"vzkit@{me}:lab", "our old bridge, claimed"
    assert _alias(ns, "vzbr6") == "vzkit:other", "another's, untouched"
    tables = in_ns(ns, "nft", "list", "tables").splitlines()
    assert "table inet vzkit" not in tables and f"table inet vzkit-{me}" in tables
    # Once: a later `inet vzkit` (another old daemon's) is never taken for ours.
    _nft(ns, _old_table(["vzbr5"]))
    with entered(ns):
        m.reconcile()
    assert "table inet vzkit" in in_ns(ns, "nft", "list", "tables").splitlines()


def test_an_old_table_naming_other_bridges_is_left_alone(
    old_host: tuple[str, Settings],
) -> None:
    ns, settings = old_host
    _nft(ns, _old_table(["vzbr5", "vzbr6"]))
    _start(ns, settings)
    assert "table inet vzkit" in in_ns(ns, "nft", "list", "tables").splitlines()
    assert _alias(ns, "vzbr5") == f"vzkit@{settings.daemon_id}:lab"


def test_a_new_state_dir_claims_nothing(tmp_path: Path) -> None:
    """No database before the identity: an old bridge of the same name is another's."""
    with namespace(f"vzl-{uuid.uuid4().hex[:8]}") as ns:
        _old_bridge(ns, "vzbr5", "vzkit:lab")
        settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
        _ = settings.daemon_id  # made before the database, as vzd does
        db = Database(settings.db_path)
        db.insert_network(LAB.name, LAB.model_dump_json())
        assert not settings.predates_identity
        with entered(ns):
            with pytest.raises(Conflict, match="before daemon identities"):
                links.ensure_bridge(
                    "vzbr5", IPv4Interface("10.86.0.1/24"), "lab", daemon=settings.daemon_id
                )
            NetworkManager(settings, db).reconcile()  # logs that lab cannot be restored
        assert _alias(ns, "vzbr5") == "vzkit:lab"
