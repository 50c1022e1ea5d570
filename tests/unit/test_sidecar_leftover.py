"""What a restarted sidecar finds of its container, as the holder answers it.

The holder here is a stand-in on a real socket (its protocol: holder/holder.c);
the processes it "holds" are this test's own children.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from activator.config import PodConfig
from activator.sidecar import ContainerSandbox, Leftover, LeftoverUnknown
from netns import proc


class FakeHolder:
    """Answers `manage` with `app_pid` and records every request."""

    def __init__(self, path: Path, app_pid: int) -> None:
        self.app_pid = app_pid
        self.requests: list[list[str]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.setblocking(False)

    async def serve(self) -> None:
        """One sidecar after the other, as the real holder (the newest wins)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            with conn:
                while request := (await loop.sock_recv(conn, 4096)).decode():
                    fields = request.split("\0")
                    self.requests.append(fields)
                    if fields[0] == "adopt":
                        self.app_pid = int(fields[1])
                    await loop.sock_sendall(conn, f"app {self.app_pid}".encode())


@contextmanager
def children(n: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """`n` processes of ours, as the holder's children would be. Only they
    count: this test process has others too (helpers other tests started)."""
    made = [subprocess.Popen(["sleep", "60"]) for _ in range(n)]
    pids = [p.pid for p in made]
    everyone = proc.children_of
    monkeypatch.setattr(proc, "children_of", lambda pid: [c for c in everyone(pid) if c in pids])
    try:
        yield pids
    finally:
        for p in made:
            p.kill()
            p.wait()


def sandbox(shared: Path) -> ContainerSandbox:
    config = PodConfig(name="app", ports=(8080,), command=())
    return ContainerSandbox(config, shared, None, ("10.0.0.2", "10.0.0.1"))  # type: ignore[arg-type]


def record(shared: Path, app_pid: int) -> None:
    """What the last sidecar recorded of its app (ContainerSandbox.app_exit)."""
    (shared / "run").mkdir(parents=True, exist_ok=True)
    (shared / "run" / "app.app").write_text(str(app_pid))


def leftover_with(shared: Path, app_pid: int) -> tuple[object, FakeHolder, ContainerSandbox]:
    async def scenario() -> tuple[object, FakeHolder, ContainerSandbox]:
        holder = FakeHolder(shared / "run" / "app.sock", app_pid)
        serving = asyncio.ensure_future(holder.serve())
        container = sandbox(shared)
        try:
            return await container.leftover(), holder, container
        finally:
            container.holder.close()
            serving.cancel()
            holder.listener.close()

    return asyncio.run(scenario())


def test_no_holder_yet_is_a_first_start(tmp_path: Path) -> None:
    async def scenario() -> object:
        return await sandbox(tmp_path).leftover()

    assert asyncio.run(scenario()) is None


def test_a_running_app_is_left_to_run(tmp_path: Path) -> None:
    found, holder, container = leftover_with(tmp_path, 4242)
    assert found is None
    assert holder.requests == [["manage"]]
    assert container._managed  # spawn_app asks the holder for it, not to manage it again


def test_no_app_is_a_leftover_for_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with children(0, monkeypatch):
        found, holder, _ = leftover_with(tmp_path, 0)
    assert found == Leftover()
    assert holder.requests == [["manage"]]


def test_an_app_restored_but_not_handed_over_goes_to_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with children(1, monkeypatch) as (restored,):
        record(tmp_path, restored)  # CRIU restores the pid it dumped
        found, holder, _ = leftover_with(tmp_path, 0)
    assert found is None
    assert holder.requests == [["manage"], ["adopt", str(restored)]]


def test_the_recorded_app_is_taken_among_other_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder is its container's subreaper: the app's orphans are its children too."""
    with children(3, monkeypatch) as (orphan, restored, other):
        record(tmp_path, restored)
        found, holder, _ = leftover_with(tmp_path, 0)
        assert proc.Process.of(orphan) is not None and proc.Process.of(other) is not None
    assert found is None
    assert holder.requests == [["manage"], ["adopt", str(restored)]]


def test_children_that_are_not_the_recorded_app_leave_it_scaled_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone orphan is not taken for the app: the image of the app is."""
    with children(1, monkeypatch) as (orphan,):
        record(tmp_path, orphan + 100_000)  # the app's pid, free while it is checkpointed
        found, holder, _ = leftover_with(tmp_path, 0)
        assert proc.Process.of(orphan) is not None
    assert found == Leftover()
    assert holder.requests == [["manage"]]


def test_children_without_a_record_are_not_guessed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with children(2, monkeypatch) as pids, pytest.raises(LeftoverUnknown) as raised:
        leftover_with(tmp_path, 0)
    assert "restart the container" in str(raised.value) and str(pids) in str(raised.value)


def test_the_app_a_sidecar_watches_is_the_one_the_next_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trip: one sidecar watches an app (started or restored), dies; the
    next finds it among the holder's children by the pid the first recorded."""

    async def scenario(app: int) -> tuple[object, FakeHolder]:
        holder = FakeHolder(tmp_path / "run" / "app.sock", 0)
        serving = asyncio.ensure_future(holder.serve())
        first, second = sandbox(tmp_path), sandbox(tmp_path)
        try:
            await first.holder.connect(0)
            first.app_exit(app)
            await asyncio.gather(*first._adopting)
            first.holder.close()  # the first sidecar dies; the app is not the holder's now
            holder.app_pid = 0
            return await second.leftover(), holder
        finally:
            second.holder.close()
            serving.cancel()
            holder.listener.close()

    with children(2, monkeypatch) as (_, app):
        found, holder = asyncio.run(scenario(app))
    assert found is None
    assert holder.requests[-2:] == [["manage"], ["adopt", str(app)]]
