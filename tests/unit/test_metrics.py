"""Metrics follow the reports a real lifecycle emits, as a pod driver passes them on."""

from __future__ import annotations

import urllib.request

from activator import commands as c
from activator import events as e
from activator.metrics import Metrics, MetricsReporter, start_exporter
from tests.unit.reporting import Clock, Pod, Recorder, feed


def value(metrics: Metrics, name: str, pod: str = "web", **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"pod": pod, **labels})


def phase(metrics: Metrics, pod: str = "web") -> str:
    """The one state of the phase enum that is 1."""
    (state,) = [
        sample.labels["pod_activator_phase"]
        for family in metrics.registry.collect()
        if family.name == "pod_activator_phase"
        for sample in family.samples
        if sample.labels["pod"] == pod and sample.value == 1
    ]
    return state


def test_a_cycle_of_checkpoint_and_restore() -> None:
    metrics, clock, then = Metrics(), Clock(), Recorder()
    reporter = MetricsReporter(metrics, then=then, clock=clock)
    pod = Pod("web")
    feed(reporter, pod, e.Boot(0))
    feed(reporter, pod, e.AppStarted(1))
    assert value(metrics, "pod_activator_running") == 1
    assert phase(metrics) == "running"
    assert value(metrics, "pod_activator_checkpoint_failures_total") == 0
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count") is None

    feed(reporter, pod, e.IdleTimerFired(11))
    assert value(metrics, "pod_activator_running") == 0
    assert phase(metrics) == "checkpointing"
    clock.now += 11
    feed(reporter, pod, e.CheckpointDone(11.2, duration_ms=120.0, image_bytes=10_000_000))
    assert phase(metrics) == "scaled-down"
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count") == 1
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_sum") == 0.12
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_bucket", le="0.15") == 1
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_bucket", le="0.1") == 0
    assert value(metrics, "pod_activator_last_checkpoint_timestamp_seconds") == clock.now
    assert value(metrics, "pod_activator_checkpoint_image_bytes") == 10_000_000

    feed(reporter, pod, e.ConnectionOpened(20, conn=1, port=80))
    clock.now += 9
    feed(reporter, pod, e.RestoreDone(20.05, duration_ms=50.0))
    assert value(metrics, "pod_activator_running") == 1
    assert value(metrics, "pod_activator_restore_duration_seconds_count") == 1
    assert value(metrics, "pod_activator_restore_duration_seconds_sum") == 0.05
    assert value(metrics, "pod_activator_last_restore_timestamp_seconds") == clock.now
    # the driver's own report of the wake's first byte
    reporter.report(pod, c.Report("first-byte", "info", "", {"first_byte_ms": 55.0}))  # type: ignore[arg-type]
    assert value(metrics, "pod_activator_wake_first_byte_seconds_count") == 1

    # every report went on to the event log, in order
    assert then.reports == [
        "starting",
        "running",
        "checkpointing",
        "scaled-down",
        "restoring",
        "running",
        "first-byte",
    ]


def test_failures_are_counted() -> None:
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    pod = Pod("db")
    feed(reporter, pod, e.Boot(0))
    feed(reporter, pod, e.AppStarted(1))
    feed(reporter, pod, e.IdleTimerFired(11))
    feed(reporter, pod, e.CheckpointFailed(11.5, reason="Can't dump io_uring"))
    assert value(metrics, "pod_activator_checkpoint_failures_total", "db") == 1
    assert value(metrics, "pod_activator_running", "db") == 1  # the app kept running
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count", "db") is None

    feed(reporter, pod, e.IdleTimerFired(40))
    feed(reporter, pod, e.CheckpointDone(40.1, duration_ms=90.0, image_bytes=1))
    feed(reporter, pod, e.WakeRequested(50))
    feed(reporter, pod, e.RestoreFailed(50.1, reason="restore: pid taken"))
    assert value(metrics, "pod_activator_restore_failures_total", "db") == 1
    assert phase(metrics, "db") == "starting"
    assert value(metrics, "pod_activator_checkpoint_failures_total", "db") == 1


def test_a_checkpoint_that_goes_straight_to_restoring_is_measured() -> None:
    """A connection during the checkpoint: the lifecycle reports 'restoring'
    (not 'scaled-down') with the checkpoint's time."""
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    pod = Pod("web")
    for event in (e.Boot(0), e.AppStarted(1), e.IdleTimerFired(11)):
        feed(reporter, pod, event)
    feed(reporter, pod, e.ConnectionOpened(11.1, conn=1, port=80))
    feed(reporter, pod, e.CheckpointDone(11.2, duration_ms=100.0, image_bytes=5))
    assert phase(metrics) == "restoring"
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count") == 1


def test_pods_are_labelled_apart_and_forgotten_when_stopped() -> None:
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    web, db = Pod("web"), Pod("db")
    for pod in (web, db):
        feed(reporter, pod, e.Boot(0))
        feed(reporter, pod, e.AppStarted(1))
    feed(reporter, web, e.IdleTimerFired(11))
    assert value(metrics, "pod_activator_running", "web") == 0
    assert value(metrics, "pod_activator_running", "db") == 1
    feed(reporter, web, e.CheckpointDone(11.2, duration_ms=100.0, image_bytes=5))
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count", "web") == 1
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count", "db") is None
    feed(reporter, web, e.StopRequested(12))  # scaled-down -> stopped
    assert value(metrics, "pod_activator_running", "web") is None
    assert value(metrics, "pod_activator_checkpoint_duration_seconds_count", "web") is None
    assert value(metrics, "pod_activator_running", "db") == 1


def test_the_exporter_serves_them() -> None:
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    pod = Pod("web")
    feed(reporter, pod, e.Boot(0))
    feed(reporter, pod, e.AppStarted(1))
    server = start_exporter(metrics, 0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics") as answer:
            text = answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'pod_activator_running{pod="web"} 1.0' in text
    assert "# TYPE pod_activator_checkpoint_duration_seconds histogram" in text
    assert 'pod_activator_checkpoint_failures_total{pod="web"} 0.0' in text
