"""What reporters (metrics, Kubernetes) are tested with: a pod as a reporter
sees it, a recorder at the end of the chain, a clock to set, and the feed of
events through a real lifecycle, as the pod driver does it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from activator import commands as c
from activator import events as e
from activator.lifecycle import Lifecycle, Policy
from activator.pod import Reporter


@dataclass
class Pod:
    """What a Reporter reads of a PodDriver: its name and its lifecycle."""

    name: str
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(Policy(scaledown_after=10)))


@dataclass
class Recorder:
    reports: list[str] = field(default_factory=list)

    def report(self, pod: Any, report: c.Report) -> None:
        self.reports.append(report.event)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # a whole second: micro_time must still write 6 digits

    def __call__(self) -> float:
        return self.now


def feed(reporter: Reporter, pod: Pod, event: e.Event) -> None:
    """As the pod driver does: handle the event, dispatch its reports."""
    for command in pod.lifecycle.handle(event):
        if isinstance(command, c.Report):
            reporter.report(pod, command)  # type: ignore[arg-type]
