"""Schemathesis against the schema vzd serves: no 5xx, no hang, every 4xx an ErrorBody.

The daemon runs in a network namespace of the test's own (fuzzed network creates make
real bridges, nft tables and dnsmasq processes) and gets well over ``MIN_CASES``
generated requests over its unix socket: positive (valid by the schema) and negative
(invalid) cases for every operation, in two passes. The first runs on an empty daemon and
leaves path parameters to the generator, so they name nothing. The second runs with
resources made for it (a stopped VM with a NIC and a snapshot, a network, a pool, volumes,
an operation) and pins path parameters to them; names in bodies (a NIC's network, a
volume and its pool, a create's source snapshot) point at them two times in three. So the
fuzzed queries and bodies reach the code behind the lookups. Each request must answer
below 500 within ``REQUEST_TIMEOUT`` seconds, each 4xx with an ErrorBody, and a progress
stream (NDJSON) must not end in a server error either. Whatever the fuzz made is deleted
at the end, and the namespace must then hold no vz link, no dnsmasq and no nft table.

What the fuzz is kept from doing, and why:

- ``POST /1.0/daemon/shutdown`` is not called: it would end the run.
- No image gets built by a fuzzed request and no guest boots. The daemon builds a known
  image (minimal, debian) on first use, which takes seconds to minutes: instance creates
  and image builds naming one that is not built are pointed at a name that does not exist
  (they still go through validation and the name checks, then fail with a 404). Creates
  get ``start: false`` (they make real stopped instances in the second pass), and the
  pinned VM's state is not fuzzed: a start would boot it.
- Storage pool paths are moved under the test's temporary directory: a pool's directory
  is made on the host's file system, which the namespace does not separate.
- ``?timeout=`` of ``/operations/{id}/wait`` is capped, so no request may wait long.

The cases are random: a failure names the request, and ``--hypothesis-seed=N`` replays a
run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import TypeAdapter, ValidationError
from requests.adapters import HTTPAdapter
from schemathesis import Case, GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.formats import unregister_string_format
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from tests.conftest import Daemon
from tests.integration.netns import dnsmasq_pids, in_ns, vz_links
from vzkit.api.instances import InstanceCreate
from vzkit.errors import VzError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

Operation = APIOperation[Any, Any, Any, Any]

BASE_URL = "http://vzd"
MIN_CASES = 1000
# Examples per operation, generation mode and pass. Operations with few distinct inputs
# (none at all, or one boolean) give fewer; the others make up for them.
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}
# Seconds any one request may take, whole body included. The slowest real work left (a
# network create or delete: bridge, nft, dnsmasq) takes about a second.
REQUEST_TIMEOUT = 15.0
WAIT_CAP = 1.0  # seconds, for ?timeout= of /operations/{id}/wait
SKIPPED = {("POST", "/1.0/daemon/shutdown")}
# Not fuzzed against the pinned instance: a start, restart or resume boots it.
NOT_PINNED = {("PUT", "/1.0/instances/{name}/state")}
BUILDABLE = {"minimal", "debian"}  # images the daemon builds on first use

# Resources the second pass pins path parameters to.
VM = "fz-vm"
NET = "fz-net"
POOL = "fz-pool"
BLOCK = "fz-blk"  # in the default pool
FSVOL = "fz-dir"  # in POOL
SNAP = "fz-snap"


# -- requests over the daemon's unix socket ------------------------------------------------


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__("localhost", **kw)
        self._path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(self._path)
        return sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=REQUEST_TIMEOUT, maxsize=2)
        self._path = path

    def _new_conn(self) -> HTTPConnection:
        self.num_connections += 1
        return _UnixConnection(self._path, timeout=self.timeout.connect_timeout)


class _UnixAdapter(HTTPAdapter):
    """Sends every request to the daemon's unix socket, whatever the URL's host."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._pool = _UnixPool(str(path))

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def unix_session(path: Path) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy from the environment
    s.mount(BASE_URL, _UnixAdapter(path))
    return s


# -- generation ----------------------------------------------------------------------------

# Subnets the kernel or dnsmasq may treat specially, besides random ones.
_ODD_SUBNETS = [
    "0.0.0.0/0",
    "0.0.0.0/8",
    "10.0.0.0/8",
    "10.255.0.0/24",  # holds the namespace's uplink
    "127.0.0.0/8",
    "127.0.0.0/29",
    "169.254.0.0/16",
    "224.0.0.0/24",
    "240.0.0.0/4",
    "255.255.255.248/29",
]


def _subnets() -> st.SearchStrategy[str]:
    address = st.integers(0, 2**32 - 1).map(lambda a: str(IPv4Address(a)))
    prefix = st.integers(0, 32)
    return st.one_of(
        st.sampled_from(_ODD_SUBNETS),
        st.builds(lambda a, p: str(IPv4Network(f"{a}/{p}", strict=False)), address, prefix),
        st.builds(lambda a, p: f"{a}/{p}", address, prefix),  # host bits set: invalid
    )


@contextlib.contextmanager
def ipv4network_format() -> Iterator[None]:
    """CIDR strings for pydantic's ``ipv4network`` format, which schemathesis lacks."""
    schemathesis.openapi.format("ipv4network", _subnets())
    try:
        yield
    finally:
        unregister_string_format("ipv4network")


# Body fields naming another resource, and what the second pass has of each kind.
_REFS = {
    "network": (NET, "vzbr0"),
    "volume": (BLOCK, FSVOL),
    "pool": ("default", POOL),
    "source": (f"{VM}/{SNAP}",),
}


def _refer(value: Any) -> None:
    """Point about two in three generated references at resources that exist (which of
    them by the generated name, so a case sends the same whenever it is replayed)."""
    if isinstance(value, list):
        for item in value:
            _refer(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in _REFS and isinstance(item, str):
                choices = (item, *_REFS[key])
                value[key] = choices[zlib.crc32(item.encode(errors="replace")) % len(choices)]
            else:
                _refer(item)


@dataclass
class Fuzz:
    session: requests.Session
    pools_root: Path
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    slowest: tuple[float, str] = (0.0, "")
    built: set[str] = field(default_factory=set)  # images fuzzed creates may use

    def prepare(self, case: Case[Any]) -> None:
        """Keep the case from real work this test must not do (see the module docstring),
        and let some of the names in its body refer to the resources of the second pass."""
        path, method = case.operation.path, case.method.upper()
        body, params, query = case.body, case.path_parameters, case.query
        _refer(body)
        if (method, path) == ("POST", "/1.0/instances") and isinstance(body, dict):
            image = body.get("image", "minimal")
            if isinstance(image, str) and image in BUILDABLE - self.built:
                body["image"] = f"{image}-not-built"
            if body.get("start", True) is True:
                body["start"] = False
        if path == "/1.0/images/{name}/build" and isinstance(params, dict):
            # A build of a built image is a no-op (its inputs have not changed), unless forced.
            name = params.get("name")
            forced = isinstance(query, dict) and _true(query.get("force"))
            if isinstance(name, str) and name in BUILDABLE and (name not in self.built or forced):
                params["name"] = "not-built"
        if (method, path) == ("POST", "/1.0/storage") and isinstance(body, dict):
            where = body.get("path")
            if isinstance(where, str) and where.startswith("/"):
                moved = str(self.pools_root) + where
                if not os.path.normpath(moved).startswith(f"{self.pools_root}/"):
                    moved = moved.replace("..", "__")
                body["path"] = moved
        if path.endswith("/wait") and isinstance(query, dict):
            timeout = query.setdefault("timeout", WAIT_CAP)  # none: wait for the end
            with contextlib.suppress(TypeError, ValueError):
                if float(timeout) > WAIT_CAP:
                    query["timeout"] = WAIT_CAP

    def check(self, case: Case[Any]) -> None:
        self.prepare(case)
        label, sent = case.operation.label, _describe(case)
        start = time.monotonic()
        try:
            response = case.call(base_url=BASE_URL, session=self.session, timeout=REQUEST_TIMEOUT)
        except requests.Timeout as exc:
            raise AssertionError(f"no answer within {REQUEST_TIMEOUT} s to {sent}") from exc
        elapsed = time.monotonic() - start
        self.sent[label] += 1
        status = response.status_code
        self.statuses[(label, status)] += 1
        self.slowest = max(self.slowest, (elapsed, label))
        assert elapsed < REQUEST_TIMEOUT, f"{elapsed:.1f} s for {sent}"
        assert status < 500, f"{status} for {sent}: {response.text[:2000]}"
        if 400 <= status < 500:
            try:
                body = response.json()
            except ValueError:
                raise AssertionError(
                    f"{status} without a JSON body for {sent}: {response.text[:500]!r}"
                ) from None
            _check_error_body(status, body)
        content_type = response.headers.get("content-type", [""])[0]
        if status < 300 and content_type.startswith("application/x-ndjson"):
            # A progress stream (image build, publish) reports its failure in its last
            # line, after its 200: that error must not be a server error either.
            for line in response.text.splitlines():
                item = json.loads(line)
                if "error" in item:
                    _check_error_body(status, item["error"])
                    error = VzError.from_dict(item["error"], status)
                    assert error.http_status < 500, f"a server error in a {status} stream: {item}"

    def run(
        self,
        op: Operation,
        mode: GenerationMode,
        examples: int,
        pins: dict[str, Any] | None = None,
    ) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode, path_parameters=pins))
        def one(case: Case[Any]) -> None:
            self.check(case)

        try:
            one()
        except Unsatisfiable:
            # Nothing to make invalid (no parameters, or only pinned ones): nothing sent.
            if mode is not GenerationMode.NEGATIVE:
                raise


def _true(value: Any) -> bool:
    """Whether the API reads ``value`` (a query parameter) as true."""
    try:
        return TypeAdapter(bool).validate_python(value) is True
    except ValidationError:
        return False


def _describe(case: Case[Any]) -> str:
    """The request, for a failure message (the case's own repr says little)."""
    parts = [f"{case.method.upper()} {case.formatted_path}"]
    if case.query:
        parts.append(f"query {case.query!r}")
    if not isinstance(case.body, NotSet):
        parts.append(f"body {case.body!r}")
    return ", ".join(parts)[:2000]


def _check_error_body(status: int, body: Any) -> None:
    """An ErrorBody: a JSON object with "error" and "code" strings."""
    assert isinstance(body, dict), f"{status}: {body!r}"
    assert isinstance(body.get("error"), str), f"{status} without 'error': {body!r}"
    assert isinstance(body.get("code"), str), f"{status} without 'code': {body!r}"


# -- the resources of the second pass ------------------------------------------------------


def _pins(op: Operation, op_id: str) -> dict[str, Any]:
    """Path parameters of ``op`` pinned to the resources :func:`_make_resources` made."""
    path = op.path
    pins: dict[str, Any] = {}
    if path.startswith("/1.0/instances/{name}"):
        pins["name"] = VM
    elif path.startswith("/1.0/networks/{name}"):
        pins["name"] = NET
    elif path.startswith("/1.0/storage/{pool}/volumes/{name}"):
        pins |= {"pool": "default", "name": BLOCK}
    elif path.startswith("/1.0/storage/{pool}"):
        pins["pool"] = POOL
    elif path.startswith("/1.0/images/{name}"):
        pins["name"] = "minimal"
    elif path.startswith("/1.0/operations/{op_id}"):
        pins["op_id"] = op_id
    if "{network}" in path:
        pins["network"] = "vzbr0"  # the pinned instance's NIC
    if "{volume}" in path:
        pins |= {"pool": "default", "volume": BLOCK}
    if "{snapshot}" in path:
        pins["snapshot"] = SNAP
    return pins


def _make_resources(c: Client, session: requests.Session, root: Path) -> str:
    """A stopped VM with a NIC and a snapshot, a network, a pool, two volumes and a
    finished operation; its id is returned."""
    c.build_image("minimal")  # about 1.5 s; the fuzz itself builds nothing
    c.create_instance(InstanceCreate(name=VM, start=False))
    c.create_snapshot(VM, SNAP)
    c.create_network({"name": NET, "subnet": "10.99.0.0/24"})
    c.create_pool(POOL, str(root / "fz-pool"))
    c.create_volume(BLOCK, "16MiB")
    c.create_volume(FSVOL, "16MiB", pool=POOL, content="filesystem")
    r = session.post(
        f"{BASE_URL}/1.0/instances",
        params={"background": "true"},
        json={"name": "fz-op", "image": "not-built", "start": False},
        timeout=REQUEST_TIMEOUT,
    )
    assert r.status_code == 202, r.text
    op_id = str(r.json()["id"])
    c.wait_operation(op_id, timeout=REQUEST_TIMEOUT)
    return op_id


def _remove_everything(c: Client) -> None:
    for inst in c.list_instances():
        c.delete_instance(inst.name, force=True)
    for vol in c.list_volumes():
        c.delete_volume(vol.name, pool=vol.pool)
    for pool in c.list_pools():
        if pool.name != "default":
            c.delete_pool(pool.name)
    for net in c.list_networks():
        c.delete_network(net.name)
    for image in c.list_images():
        c.delete_image(image.name)


def _order(ops: list[Operation]) -> list[Operation]:
    """Deletes last (the instance's very last), so they remove the pinned resources only
    once everything else has been run against them."""

    def key(op: Operation) -> tuple[int, int]:
        return (op.method.upper() == "DELETE", op.path == "/1.0/instances/{name}")

    return sorted(ops, key=key)


def test_api_fuzz(netd: Daemon) -> None:
    assert netd.netns
    session = unix_session(netd.socket)
    c = netd.client()
    served = session.get(f"{BASE_URL}/openapi.json", timeout=REQUEST_TIMEOUT)
    assert served.status_code == 200, served.text
    schema = schemathesis.openapi.from_dict(served.json())
    loaded = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in loaded), [r for r in loaded if not isinstance(r, Ok)]
    ops = _order(
        [
            r.ok()
            for r in loaded
            if isinstance(r, Ok) and (r.ok().method.upper(), r.ok().path) not in SKIPPED
        ]
    )
    fuzz = Fuzz(session, netd.root / "fuzz-pools")
    failures: list[str] = []

    def run(op: Operation, pins: dict[str, Any] | None, what: str) -> None:
        for mode, examples in EXAMPLES.items():
            try:
                fuzz.run(op, mode, examples, pins)
            except Exception as exc:
                # The notes hold the falsifying case and a curl command that replays it.
                notes = "\n".join(getattr(exc, "__notes__", ()))
                failures.append(f"{op.label} [{what}, {mode.value}]: {exc!r}\n{notes}")

    start = time.monotonic()
    with ipv4network_format():
        for op in ops:
            run(op, None, "generated")
        op_id = _make_resources(c, session, netd.root)
        fuzz.built.add("minimal")
        for op in ops:
            pins = _pins(op, op_id)
            if not pins or (op.method.upper(), op.path) not in NOT_PINNED:
                run(op, pins, f"with resources, pinned {pins}")
    elapsed = time.monotonic() - start

    total = sum(fuzz.sent.values())
    print(f"\n{total} cases in {elapsed:.1f} s; slowest: {fuzz.slowest[1]} {fuzz.slowest[0]:.2f} s")
    for (label, status), n in sorted(fuzz.statuses.items()):
        print(f"  {n:4d} {status} {label}")
    assert not failures, "\n\n".join(failures)
    assert total >= MIN_CASES

    _remove_everything(c)
    assert vz_links(netd.netns) == []
    assert dnsmasq_pids(netd) == []
    assert "vzkit" not in in_ns(netd.netns, "nft", "list", "tables")


_JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("DELETE", "/1.0/instances", None, 405, "Method Not Allowed"),
        ("GET", "/1.0/no-such-thing", None, 404, "Not Found"),
        ("POST", "/1.0/networks", b"{\xbb}", 400, "error parsing the body"),  # not UTF-8
        ("POST", "/1.0/networks", b'{"name": "a",', 422, "the body is not valid JSON"),
        ("POST", "/1.0/networks", b'{"name": "\\ud800"}', 422, "invalid network name"),
        ("POST", "/1.0/networks", b"[]", 422, "valid dictionary"),
    ],
)
def test_errors_outside_the_schema(
    vzd: Daemon, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    """What the fuzz does not send (methods and routes the schema lacks, bodies that are
    not JSON) is answered with an ErrorBody too, hint included."""
    r = unix_session(vzd.socket).request(
        method, BASE_URL + path, data=body, headers=_JSON, timeout=REQUEST_TIMEOUT
    )
    assert r.status_code == status, r.text
    error = r.json()
    _check_error_body(status, error)
    assert message in error["error"] and error["hint"], error
    if status == 405:
        assert r.headers["allow"]


def test_publish_errors_come_before_the_stream(vzd: Daemon, client: Client) -> None:
    """A publish that cannot work is a 4xx, not an error inside a 200 progress stream."""
    client.build_image("minimal")
    client.create_instance(InstanceCreate(name="fz-publish", start=False))
    session = unix_session(vzd.socket)
    url = f"{BASE_URL}/1.0/instances/fz-publish/publish"
    r = session.post(url, params={"image": "mine"}, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 400, r.text
    assert "has no disk of its own" in r.json()["error"]
    r = session.post(f"{BASE_URL}/1.0/instances/ghost/publish", params={"image": "mine"})
    assert r.status_code == 404, r.text
