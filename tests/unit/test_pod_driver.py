"""The pod driver and proxy on loopback (see fakepod.py); no root needed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from activator.journal import Journal
from activator.lifecycle import Phase

from .fakepod import Harness, get, run, until


def test_requests_pass_through_while_running(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        assert harness.sandbox.redirects == {harness.pod.config.ports[0]: harness.shadow_port}
        answer = await get(harness.shadow_port)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert b'"hits": 1' in answer

    run(tmp_path, scenario)


def test_idle_pod_is_checkpointed_and_the_next_connection_restores_it(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
        assert harness.pod.app_pid is None
        answers = await asyncio.gather(*(get(harness.shadow_port) for _ in range(20)))
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert harness.reports.events.count("restoring") == 1
        assert "first-byte" in harness.reports.events
        # The image is deleted once the app is back.
        assert not harness.pod.images.exists()

    run(tmp_path, scenario)


def test_failed_restore_starts_the_app_cold_and_serves(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
        harness.criu.restore_error = "corrupted image"
        answer = await get(harness.shadow_port)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        events = harness.reports.events
        assert events.index("restore-failed") < len(events) - 1
        assert events[events.index("restore-failed") - 1 :][:3] == [
            "starting",
            "restore-failed",
            "running",
        ]
        assert (harness.pod.state_dir / "images.failed").exists()

    run(tmp_path, scenario)


def test_an_app_that_exits_is_restarted(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.app_pid is not None)
        first = harness.pod.app_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: harness.pod.app_pid not in (None, first))
        assert "app-exited" in harness.reports.events
        assert (await get(harness.shadow_port)).startswith(b"HTTP/1.1 200 OK")

    run(tmp_path, scenario)


def test_connections_while_the_app_cannot_start_are_refused_with_a_reason(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
        harness.criu.restore_error = "corrupted image"
        harness.sandbox.spawn_error = "no such file: sampleapp"
        try:
            answer = await get(harness.shadow_port)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", "a connection that cannot be served must not look answered"
        assert harness.pod.lifecycle.phase is Phase.FAILED
        assert "start-failed" in harness.reports.events

    run(tmp_path, scenario)


def test_stop_ends_the_app_and_removes_everything(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.app_pid is not None)
        pid = harness.pod.app_pid
        assert pid is not None
        harness.pod.stop()
        await asyncio.wait_for(harness.pod.stopped.wait(), 30)
        assert harness.sandbox.destroyed
        assert not harness.pod.state_dir.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    run(tmp_path, scenario)


def test_an_image_a_killed_activator_had_not_deleted_yet_is_no_obstacle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed activator's images.restored-1 is in the state dir: this driver's
    first wake renames its image to that same name."""
    left = tmp_path / "t" / "images.restored-1"
    left.mkdir(parents=True)
    (left / "pages-1.img").write_bytes(b"the old app's memory")

    async def scenario(harness: Harness) -> None:
        await until(lambda: harness.pod.lifecycle.phase is Phase.SCALED_DOWN)
        assert (await get(harness.shadow_port)).startswith(b"HTTP/1.1 200 OK")
        await until(lambda: not any(harness.pod.state_dir.glob("images.restored-*")))

    run(tmp_path, scenario)
    assert "internal error" not in caplog.text


def test_a_dump_a_killed_activator_left_is_kept_with_its_last_step_done(tmp_path: Path) -> None:
    """The journal names a checkpoint whose CRIU finished after its activator
    was killed: the next one keeps the image and empties its conntrack table,
    the dump's last step (forget_conntrack), which a restore does not repeat."""
    written = tmp_path / "t" / "images.new"
    written.mkdir(parents=True)
    (written / "stats-dump").write_bytes(b"complete")
    (written / "pages-1.img").write_bytes(b"x" * 100)
    (written / "netns-ct-9.img").write_bytes(b"the table at the dump")
    journal = Journal(tmp_path / "t")
    journal.begin("checkpoint", written)
    gone = subprocess.Popen(["true"])  # its CRIU: ended, nothing to wait for
    gone.wait()
    journal.criu_started(gone.pid)

    async def scenario(harness: Harness) -> None:
        assert harness.pod.lifecycle.phase is Phase.SCALED_DOWN
        assert (harness.pod.images / "netns-ct-9.img").stat().st_size == 0
        assert (await get(harness.shadow_port)).startswith(b"HTTP/1.1 200 OK")

    run(tmp_path, scenario, leftover=SimpleNamespace(app_pid=None))
