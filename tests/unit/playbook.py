"""Playbooks: the story of one pod, read top to bottom.

    assert (
        Playbook(lifecycle)
        >> Boot(0)
        << StartApp("first start")
        >> AppStarted(0.1)
        << SetIdleDeadline(10.1)
    )

`>> event` feeds the lifecycle, `<< command` is what it must answer, in order
and nothing else. Reports (log and event lines) are left out unless the
playbook is made with `reports=True`; then `Reported("restore-failed")`
matches a report by its event name.
"""

from __future__ import annotations

from dataclasses import dataclass

from activator import commands as c
from activator import events as e
from activator.lifecycle import Lifecycle


@dataclass(frozen=True)
class Reported:
    event: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, c.Report) and other.event == self.event

    __hash__ = object.__hash__


class Playbook:
    def __init__(self, lifecycle: Lifecycle, *, reports: bool = False) -> None:
        self.lifecycle = lifecycle
        self.reports = reports
        self.expected: list[object] = []
        self.actual: list[object] = []

    def __rshift__(self, event: e.Event) -> Playbook:
        self.expected.append(event)
        self.actual.append(event)
        for command in self.lifecycle.handle(event):
            if self.reports or not isinstance(command, c.Report):
                self.actual.append(command)
        return self

    def __lshift__(self, command: object) -> Playbook:
        self.expected.append(command)
        return self

    def __bool__(self) -> bool:
        if self.expected != self.actual:
            story = "\n".join(
                f"{'>>' if isinstance(x, e.Event) else '<<'} {x!r}" for x in self.actual
            )
            raise AssertionError(f"the lifecycle told another story:\n{story}")
        return True
