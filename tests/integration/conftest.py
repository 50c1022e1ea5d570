"""Fixtures of the integration tests: `activator run` of the sample app or of a
real server (harness.Activator both), and the scratch space servers need.

Each fixture tears down every activator it started, the last first, and fails
the test naming whatever was left of their pods (then removed).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration.harness import (
    APP_PORT,
    PYTHON,
    START_TIMEOUT,
    Activator,
    StartActivator,
    assert_nothing_left,
    run_activator,
    unique_name,
)
from tests.integration.servers import PodRun, Scratch, Server, StartPod, Unavailable


@pytest.fixture(scope="session")
def scratch() -> Iterator[Scratch]:
    """Initialised data dirs (MariaDB, PostgreSQL) made once, and dirs other users reach."""
    made = Scratch()
    yield made
    made.close()


@pytest.fixture
def activator(tmp_path: Path) -> Iterator[StartActivator]:
    """Start `activator run` (one pod, the sample app); everything is removed at teardown."""
    started: list[Activator] = []

    def start(
        *,
        scaledown_after: str = "1s",
        hold_mib: int = 0,
        name: str | None = None,
        verbose: bool = False,
        state_dir: Path | None = None,
        adopting: bool = False,
        image_key: Path | None = None,
        flags: Sequence[str] = (),
        log_level: str = "info",
    ) -> Activator:
        name = name or unique_name()
        workdir = tmp_path / f"{name}-{len(started)}"
        state_dir = state_dir or workdir / "state"
        app = [str(PYTHON), "-m", "activator.sampleapp", "--port", str(APP_PORT)]
        if hold_mib:
            app += ["--hold-mib", str(hold_mib)]
        if verbose:
            app += ["--verbose"]
        if image_key:
            flags = ["--image-key", str(image_key), *flags]
        proc = run_activator(
            app,
            workdir,
            name=name,
            port=APP_PORT,
            scaledown_after=scaledown_after,
            flags=flags,
            state_dir=state_dir,
            log_level=log_level,
        )
        act = Activator(name, proc, workdir, state_dir)
        started.append(act)
        # An adopted pod comes up scaled down; the test waits for that itself.
        if not adopting:
            act.wait_for("running", timeout=START_TIMEOUT)
        return act

    yield start
    assert_nothing_left(started)


@pytest.fixture
def pod(tmp_path: Path, scratch: Scratch) -> Iterator[StartPod]:
    """Start `server` in a pod under `activator run ... FLAGS` (scaled down after 1 s
    without activity); at teardown everything of every pod started is stopped and removed."""
    runs: list[PodRun] = []
    shared_dirs: list[Path] = []

    def start(server: Server, *flags: str) -> PodRun:
        workdir = tmp_path / f"{server.name}-{len(runs)}"
        try:
            server.check_available()
            workdir.mkdir()
            if server.other_users:  # its app dir must be reachable by them
                app_dir = scratch.workdir(f"{server.name}-{uuid.uuid4().hex[:8]}")
                shared_dirs.append(app_dir)
            else:
                app_dir = workdir
            launch = server.launch(app_dir, scratch)
        except Unavailable as exc:
            pytest.skip(str(exc))
        run = PodRun.start(server, launch, workdir / "activator", extra_flags=flags)
        runs.append(run)
        run.wait_for("running", timeout=START_TIMEOUT)
        return run

    yield start
    try:
        assert_nothing_left(runs)
    finally:
        for path in shared_dirs:
            shutil.rmtree(path, ignore_errors=True)
