"""Where reports go: one JSON line per event for machines, a log line for people."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, TextIO

from activator import commands as c

if TYPE_CHECKING:
    from activator.pod import PodDriver

log = logging.getLogger("activator")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class EventLog:
    """Writes each report as a JSON line to `stream` (if any) and logs it."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def report(self, pod: PodDriver, report: c.Report) -> None:
        self.write(pod.name, pod.lifecycle.phase.value, report)

    def write(self, pod: str, phase: str, report: c.Report) -> None:
        log.log(_LEVELS[report.level], "pod %s: %s", pod, report.message)
        if self.stream is None:
            return
        line: dict[str, object] = {
            "time": round(time.time(), 3),
            "pod": pod,
            "event": report.event,
            "phase": phase,
            "message": report.message,
        }
        # Details never overwrite the fields every line has.
        line.update((k, v) for k, v in report.details.items() if k not in line)
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()
