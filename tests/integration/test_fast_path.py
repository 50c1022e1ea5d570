"""The fast path against real pods: connections from another pod reach the app
directly while it runs, the activator still sees every one of them, and no
request is lost across scale-downs and wakes.

The sample app's /state names its peer: 127.0.0.1 through the activator, the
client pod's address when the connection came directly.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from netns.namespace import NetnsThread
from tests.integration.harness import (
    APP_PORT,
    NEEDS_ROOT,
    NETNS_DIR,
    PYTHON,
    Activator,
    StartActivator,
    unique_name,
)
from tests.integration.test_activator import HTTP_TIMEOUT, cli, cli_seeing_only, get_state

pytestmark = NEEDS_ROOT

IDLE = 1.0  # the fast pod's scale-down duration, seconds


def add_client_pod(act: Activator) -> str:
    """A second pod of `act`, only to have a client with its own address."""
    name = unique_name("c")
    act.pods.append(name)
    mark = act.mark()
    cli_seeing_only(
        act,
        "add", "--name", name, "--port", str(APP_PORT), "--scaledown-after", "1h",
        "--", str(PYTHON), "-m", "activator.sampleapp", "--port", str(APP_PORT),
    )  # fmt: skip
    act.wait_for("running", after=mark, pod=name)
    return name


def address_of(pod: str) -> str:
    listed = {p["name"]: p for p in json.loads(cli("status", "--json").stdout)}
    address: str = listed[pod]["address"]
    return address


@contextmanager
def connection_from(pod: str, address: str) -> Iterator[http.client.HTTPConnection]:
    """A keep-alive HTTP connection from inside `pod` to `address`."""
    thread = NetnsThread(NETNS_DIR / f"pa-{pod}")
    try:
        sock = thread.socket()
        sock.settimeout(HTTP_TIMEOUT)
        sock.connect((address, APP_PORT))
        conn = http.client.HTTPConnection(address, APP_PORT, timeout=HTTP_TIMEOUT)
        conn.sock = sock
        try:
            yield conn
        finally:
            conn.close()
    finally:
        thread.close()


def state_over(conn: http.client.HTTPConnection) -> dict[str, object]:
    conn.request("GET", "/state")
    response = conn.getresponse()
    assert response.status == 200
    state: dict[str, object] = json.loads(response.read())
    return state


def state_from(pod: str, address: str) -> dict[str, object]:
    with connection_from(pod, address) as conn:
        return state_over(conn)


def wait_until_direct(client: str, address: str) -> dict[str, object]:
    """The path opens just after the app runs: until then, the activator relays."""
    deadline = time.monotonic() + 10
    while (state := state_from(client, address))["peer"] == "127.0.0.1":
        assert time.monotonic() < deadline, "the fast path did not open"
        time.sleep(0.05)
    return state


def checkpoints(act: Activator, after: int) -> int:
    return sum(1 for ev in act.events()[after:] if ev.get("event") == "checkpointing")


def test_direct_connections_are_counted_and_a_wake_keeps_the_state(
    activator: StartActivator,
) -> None:
    act = activator(scaledown_after=f"{IDLE}s", flags=["--fast-path"])
    client = add_client_pod(act)
    app, client_address = address_of(act.name), address_of(client)
    before = wait_until_direct(client, app)
    assert before["peer"] == client_address
    # The node's own address is where probes come from: it still goes through us.
    assert get_state(app)["peer"] == "127.0.0.1"

    # An open connection the activator does not relay still holds the pod up.
    mark = act.mark()
    with connection_from(client, app) as conn:
        assert state_over(conn)["peer"] == client_address
        time.sleep(3 * IDLE)
        assert state_over(conn)["boot_id"] == before["boot_id"]
        assert checkpoints(act, mark) == 0, "scaled down under an open direct connection"
        # The idle time ran out at least once meanwhile and found it open.
        status = act.status()
        assert status["direct_connections"] == 1 and status["open_connections"] == 0, status
    act.wait_for("scaled-down", after=mark)
    assert act.status()["fast_path"] == "closed"

    # Scaled down, a connection comes to the activator and wakes the app.
    mark = act.mark()
    woken = state_from(client, app)
    act.wait_for("running", after=mark)
    assert woken["peer"] == "127.0.0.1"
    assert woken["boot_id"] == before["boot_id"]  # restored, not started cold
    after = wait_until_direct(client, app)
    assert act.status()["fast_path"] == "open"
    (row,) = [line for line in cli("status").stdout.splitlines() if line.startswith(act.name)]
    assert "running (fast path)" in row, row
    assert after["boot_id"] == before["boot_id"]
    assert after["hits"] > woken["hits"]  # type: ignore[operator]


def test_requests_around_the_idle_deadline_are_all_served_by_the_same_app(
    activator: StartActivator,
) -> None:
    """Gaps just under and over the scale-down duration: some requests come
    while the path closes and the activator looks again, some while it
    checkpoints, some to a scaled-down pod. None may fail; one app serves all."""
    act = activator(scaledown_after=f"{IDLE}s", flags=["--fast-path"])
    client = add_client_pod(act)
    app = address_of(act.name)
    first = wait_until_direct(client, app)
    mark = act.mark()
    rng = random.Random(7)
    peers = set()
    for _ in range(20):
        time.sleep(rng.uniform(0.6, 1.6) * IDLE)
        state = state_from(client, app)
        assert state["boot_id"] == first["boot_id"], "the app was started cold"
        peers.add(state["peer"])
    assert checkpoints(act, mark) > 0  # some gaps were long enough
    assert len(peers) == 2  # directly and through the activator
