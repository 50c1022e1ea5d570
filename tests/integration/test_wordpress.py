"""The WordPress + MariaDB cascade: one HTTP request wakes the web pod, whose
database connection wakes the database pod.

MariaDB runs in one local pod and WordPress (Debian's, on nginx + php-fpm) in
another, each under its own `activator run` (tests/integration/wordpress.py
sets them up: database, wp-config pointing at the database pod's address,
WordPress's own install, a post with a unique title). The pods scale down
when the test asks (`activator scale-down`), so that the test chooses which
one is cold:

- cold: both scaled down; one GET of the post's page restores web, then the
  database (its connection comes from the restored PHP), and the page has the
  post's title; three times, each time with every process back;
- half-cold: only web scaled down; the database is not touched;
- database only: web running, the database scaled down (PHP connects per
  request, so the web pod holds no connection across the checkpoint);
- warm: nothing restored.

Synchronisation is on each activator's events file, polled with deadlines.
Timings are measured by bench/wordpress.py, never asserted here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import NEEDS_ROOT, Event, ns_members, phase_changes
from tests.integration.servers import (
    FAILURES,
    PodRun,
    Scratch,
    Unavailable,
    read_image_tree,
)
from tests.integration.wordpress import Stack, WordPressWeb, check_available, scale_down

pytestmark = NEEDS_ROOT

CYCLES = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Both pods, the site and its post, once for the module; everything removed after."""
    try:
        check_available()
    except Unavailable as exc:
        pytest.skip(f"{exc} (scripts/setup-test-servers installs it)")
    scratch = Scratch()
    made = Stack(tmp_path_factory.mktemp("wordpress"), scratch)
    try:
        made.start()
        yield made
    finally:
        problems = made.teardown()
        scratch.close()
        assert not problems, "left behind (now removed): " + "; ".join(problems)


def _after(run: PodRun, mark: int) -> list[Event]:
    return run.events()[mark:]


def _restored(run: PodRun, mark: int) -> Event:
    """The pod was restored (not started cold) since `mark`, and nothing failed: its 'running'."""
    events = _after(run, mark)
    assert phase_changes(events)[:2] == ["restoring", "running"], (run.name, events)
    running = next(ev for ev in events if ev["event"] == "running")
    assert running.get("restore_ms") is not None, f"{run.name}: a cold start: {running}"
    assert not [ev for ev in events if ev["event"] in FAILURES], (run.name, events)
    return running


def _untouched(run: PodRun, mark: int) -> None:
    events = _after(run, mark)
    assert not phase_changes(events), f"{run.name} changed phase: {events}"
    assert not [ev for ev in events if ev["event"] in FAILURES], (run.name, events)


def _both_running(stack: Stack) -> tuple[PodRun, PodRun]:
    """Both pods, running: a GET of the post wakes whichever is not."""
    assert stack.web is not None and stack.db is not None
    stack.get_post()
    return stack.web, stack.db


def test_one_request_wakes_web_then_database_and_serves_the_post(stack: Stack) -> None:
    web, db = _both_running(stack)
    namespaces = {run.name: (run.pause(), run.pid_namespace()) for run in (web, db)}
    before = {run.name: set(run.app()) for run in (web, db)}
    assert len(before[web.name]) == WordPressWeb.processes, before[web.name]
    for cycle in range(1, CYCLES + 1):
        scale_down(web)
        scale_down(db)
        images = {}
        for run in (web, db):
            pause, pid_ns = namespaces[run.name]
            assert ns_members("pid", pid_ns) == {pause}, f"cycle {cycle}: {run.name} not empty"
            images[run.name] = read_image_tree(run.images).pids
            assert images[run.name] == before[run.name], (cycle, run.name, images[run.name])
        marks = {run.name: run.mark() for run in (web, db)}

        stack.get_post()  # one request: the page has the post's title (checked there)

        web_running = _restored(web, marks[web.name])
        _restored(db, marks[db.name])
        db_restoring = next(ev for ev in _after(db, marks[db.name]) if ev["event"] == "restoring")
        # The cascade: the database's wake comes from the restored PHP, so after
        # web runs again (a causal order, on one clock; no duration is asserted).
        assert db_restoring["time"] >= web_running["time"], (web_running, db_restoring)
        for run in (web, db):
            assert set(run.app()) == images[run.name], f"cycle {cycle}: {run.name} processes"


@pytest.mark.parametrize("cold", ["web", "db"])
def test_one_pod_scaled_down_only_it_is_restored(stack: Stack, cold: str) -> None:
    """Half-cold: only web scaled down; or only the database, and web's PHP
    reconnects to it."""
    web, db = _both_running(stack)
    down, up = (web, db) if cold == "web" else (db, web)
    scale_down(down)
    down_mark, up_mark = down.mark(), up.mark()
    stack.get_post()
    _restored(down, down_mark)
    _untouched(up, up_mark)


def test_warm_nothing_restored(stack: Stack) -> None:
    web, db = _both_running(stack)
    web_mark, db_mark = web.mark(), db.mark()
    page, _ = stack.get_post()
    _untouched(web, web_mark)
    _untouched(db, db_mark)
    assert stack.post is not None and f"{stack.post.title}: body" in page
