"""Prometheus metrics, fed from the reports the pods already emit.

`MetricsReporter` is a Reporter (see pod.py): every `commands.Report` a pod
driver emits passes through it, and it reads what the metrics need from the
report's event and details (checkpoint_ms, restore_ms, image_bytes,
first_byte_ms) and from the pod's phase, then hands the report on (to the
EventLog). Nothing in the lifecycle knows about metrics. `start_exporter`
serves them on a port (the sidecar's 9464, named `metrics`).

Every series has the label `pod`: the activator's name for the pod (one
activator may manage several). A pod's series go away when it stops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

from activator import commands as c
from activator.lifecycle import Phase

if TYPE_CHECKING:
    from activator.pod import PodDriver, Reporter

# Raw CRIU here takes 45 ms to restore 16 MiB and 330 ms to dump 512 MiB
# (DESIGN.md); a wake over 10 s is a failure in all but name.
_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The activator's metrics, in a registry of their own (tests make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.checkpoint_seconds = Histogram(
            "pod_activator_checkpoint_duration_seconds",
            "Time to checkpoint the app (CRIU dump and the activator's work around it).",
            ["pod"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "pod_activator_restore_duration_seconds",
            "Time to restore the app from its checkpoint.",
            ["pod"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "pod_activator_wake_first_byte_seconds",
            "From accepting the connection that woke the app to its first byte to the client.",
            ["pod"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "pod_activator_last_checkpoint_timestamp_seconds",
            "Unix time of the last successful checkpoint.",
            ["pod"],
            registry=r,
        )
        self.last_restore = Gauge(
            "pod_activator_last_restore_timestamp_seconds",
            "Unix time of the last successful restore.",
            ["pod"],
            registry=r,
        )
        self.image_bytes = Gauge(
            "pod_activator_checkpoint_image_bytes",
            "Size of the last checkpoint image on disk.",
            ["pod"],
            registry=r,
        )
        self.running = Gauge(
            "pod_activator_running",
            "1 while the app runs and serves, 0 otherwise (scaled down, on the way, failed).",
            ["pod"],
            registry=r,
        )
        self.phase = Enum(
            "pod_activator_phase",
            "The pod's lifecycle phase.",
            ["pod"],
            states=[p.value for p in Phase],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "pod_activator_checkpoint_failures",
            "Checkpoints that failed (the app kept running).",
            ["pod"],
            registry=r,
        )
        self.restore_failures = Counter(
            "pod_activator_restore_failures",
            "Restores that failed (the app was started cold).",
            ["pod"],
            registry=r,
        )

    def forget(self, pod: str) -> None:
        """Drop a stopped pod's series, so that pods that come and go do not pile up."""
        for metric in (
            self.checkpoint_seconds,
            self.restore_seconds,
            self.first_byte_seconds,
            self.last_checkpoint,
            self.last_restore,
            self.image_bytes,
            self.running,
            self.phase,
            self.checkpoint_failures,
            self.restore_failures,
        ):
            # prometheus_client raises KeyError for a series never created.
            with contextlib.suppress(KeyError):
                metric.remove(pod)


class MetricsReporter:
    """A Reporter that updates `metrics` from each report, then passes it on."""

    def __init__(
        self,
        metrics: Metrics,
        then: Reporter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.then = then
        self.clock = clock

    def report(self, pod: PodDriver, report: c.Report) -> None:
        try:
            self._update(pod.name, pod.lifecycle.phase, report)
        finally:  # metrics never cost the event log a line
            if self.then is not None:
                self.then.report(pod, report)

    def _update(self, name: str, phase: Phase, report: c.Report) -> None:
        m = self.metrics
        details = report.details
        if phase is Phase.STOPPED:
            m.forget(name)
            return
        # A checkpoint's time comes with the phase after it: scaled-down, or
        # restoring when a connection came in meanwhile; a restore's with running.
        if (ms := _number(details.get("checkpoint_ms"))) is not None:
            m.checkpoint_seconds.labels(name).observe(ms / 1000)
            m.last_checkpoint.labels(name).set(self.clock())
        if (size := _number(details.get("image_bytes"))) is not None:
            m.image_bytes.labels(name).set(size)
        if (ms := _number(details.get("restore_ms"))) is not None:
            m.restore_seconds.labels(name).observe(ms / 1000)
            m.last_restore.labels(name).set(self.clock())
        if report.event == "first-byte":
            if (ms := _number(details.get("first_byte_ms"))) is not None:
                m.first_byte_seconds.labels(name).observe(ms / 1000)
        elif report.event == "checkpoint-failed":
            m.checkpoint_failures.labels(name).inc()
        elif report.event == "restore-failed":
            m.restore_failures.labels(name).inc()
        # Counters start at 0 for a pod seen at all, so rates work from the start.
        m.checkpoint_failures.labels(name)
        m.restore_failures.labels(name)
        m.running.labels(name).set(1 if phase is Phase.RUNNING else 0)
        m.phase.labels(name).state(phase.value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def start_exporter(metrics: Metrics, port: int, host: str = "0.0.0.0") -> Any:
    """Serve /metrics on `port` from a thread of its own; returns the HTTP
    server (`.server_port` is the bound port; `.shutdown()` stops it)."""
    server, _thread = _start_http_server(port, host, registry=metrics.registry)
    return server
