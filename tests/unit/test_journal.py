"""The journal: what a killed activator's CRIU was doing, and waiting for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from activator.journal import Journal, JournalError, Operation, wait_for_exit
from netns.proc import Process


def test_an_operation_is_pending_until_it_ends(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.pending() is None
    journal.begin("checkpoint", tmp_path / "images.new")
    assert journal.pending() is None, "written once CRIU runs, not before"
    with subprocess.Popen(["sleep", "5"]) as criu:
        journal.criu_started(criu.pid)
        pending = journal.pending()
        assert pending == Operation(
            "checkpoint", str(tmp_path / "images.new"), Process.of(criu.pid)
        )
        criu.kill()
    assert (journal.path.stat().st_mode & 0o777) == 0o600
    # What a later activator reads is the same record.
    assert Journal(tmp_path).pending() == pending
    journal.end()
    assert journal.pending() is None
    journal.end()  # ending twice is harmless (the adoption ends what it found)


def test_a_damaged_journal_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.path.write_text('{"kind": "checkpoint"')
    with pytest.raises(JournalError, match=r"operation\.json"):
        journal.pending()


def test_waiting_for_a_process_that_ends_and_one_that_does_not() -> None:
    with subprocess.Popen(["sleep", "0.2"]) as quick, subprocess.Popen(["sleep", "30"]) as slow:
        quick_process, slow_process = Process.of(quick.pid), Process.of(slow.pid)
        assert quick_process is not None and slow_process is not None
        try:
            assert wait_for_exit(quick_process, 10.0)
            assert not wait_for_exit(slow_process, 0.1)
        finally:
            slow.kill()


def test_a_reused_pid_is_not_waited_for() -> None:
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            impostor = Process(other.pid, start=1)  # same pid, another start time
            assert wait_for_exit(impostor, 5.0)
        finally:
            other.kill()
