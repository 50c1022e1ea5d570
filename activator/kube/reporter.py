"""KubeReporter: the pods' reports, told to Kubernetes in the background.

A Reporter like metrics.MetricsReporter: `report()` only notes what a report
changes (the container's phase label, an Event, whether its requests should
be lowered) and wakes a background task; the task brings the API server in
line, one request at a time. Nothing the lifecycle does waits for it, and
nothing it meets (an API server down, a refusal) reaches the lifecycle: each
failure is logged once, with what to do, and the activator goes on.

What is sent, and when:

- labels are state: each round patches the latest phase of every container
  whose label changed, all in one merge patch; a burst of changes within
  SETTLE of the first is one patch; a failure is retried with backoff;
- Events are news: each is sent once, a repetition within the series window
  counts in the first one's series (a merge patch of `series`); one that
  fails is logged and dropped, and its series starts again next time;
- requests (when the pod's annotation asks for it): a scale-down first
  records the originals in the pod's annotation (a restarted sidecar reads
  them back), then lowers the requests; a wake puts them back first thing in
  the next round, without SETTLE, concurrently with the restore: the wake
  never waits on the API server, so the restored app may run on the floor's
  share for the few milliseconds the resize takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from activator import commands as c
from activator.kube import status as st
from activator.lifecycle import Phase

if TYPE_CHECKING:
    from activator.kube.api import ApiFailure, KubeApi
    from activator.pod import PodDriver, Reporter

log = logging.getLogger(__name__)

# Changes this close together go out as one request.
SETTLE = 0.25
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# Events kept while the API server cannot take them; older ones are dropped.
MAX_PENDING_EVENTS = 100
# How long `close()` lets the last changes (the `stopped` labels) go out.
CLOSE_TIMEOUT = 2.0


@dataclass
class _Series:
    first_seen: float
    last_seen: float
    count: int = 1
    name: str | None = None  # the Event's, once created
    sent: int = 0  # the count the API server has


class KubeReporter:
    """A Reporter that keeps the pod's labels, Events and requests in line with
    each report, in the background, then passes the report on to `then`."""

    def __init__(
        self,
        pod: st.PodRef,
        then: Reporter | None = None,
        *,
        connect: Callable[[], KubeApi] | None = None,
        floor: st.ResizeFloor | None = None,
        clock: Callable[[], float] = time.time,
        settle: float = SETTLE,
        disabled: str | None = None,
    ) -> None:
        self.pod = pod
        self.then = then
        self.floor = floor or st.ResizeFloor()
        self.clock = clock
        self.settle = settle
        self._connect = connect or (lambda: _in_cluster(pod))
        self._disabled = disabled
        self._warned_disabled = False
        self._api: KubeApi | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = BACKOFF_FIRST
        self._closing = False
        self._seen: set[str] = set()
        self._stopped: set[str] = set()
        self._label_warned: set[str] = set()
        self._labels: dict[str, str] = {}  # label -> the latest phase
        self._labels_sent: dict[str, str] = {}
        self._facts: st.PodFacts | None = None
        self._resize = False  # the pod's annotation asks for it (read with the facts)
        self._want_lowered: set[str] = set()  # scaled down now
        self._lowering_done: set[str] = set()  # this scale-down was handled (lowered or not)
        self._saved: dict[str, dict[str, str]] = {}  # lowered containers -> their originals
        self._saved_sent: dict[str, dict[str, str]] = {}  # what the annotation holds
        self._series: dict[st.EventSpec, _Series] = {}
        self._pending_events: dict[st.EventSpec, None] = {}  # an ordered set
        self._failing: set[str] = set()
        self._last_unique = 0

    @classmethod
    def from_env(
        cls, then: Reporter | None = None, floor: st.ResizeFloor | None = None
    ) -> KubeReporter:
        """For the pod named by POD_NAME/POD_NAMESPACE (inject.py sets them);
        outside such a pod it only passes reports on."""
        name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        if name and namespace:
            return cls(st.PodRef(name, namespace), then, floor=floor)
        return cls(
            st.PodRef(name or "", namespace or ""),
            then,
            disabled="POD_NAME and POD_NAMESPACE are not set (the injection sets them)",
        )

    # -- the Reporter: bookkeeping only, never I/O -------------------------------

    def report(self, pod: PodDriver, report: c.Report) -> None:
        try:
            self._note(pod.name, pod.lifecycle.phase, report)
        except Exception:  # a bug here must not cost the lifecycle a report
            log.exception("pod %s: Kubernetes status: cannot note %s", pod.name, report.event)
        finally:
            if self.then is not None:
                self.then.report(pod, report)

    def _note(self, container: str, phase: Phase, report: c.Report) -> None:
        if self._disabled is not None:
            if not self._warned_disabled:
                self._warned_disabled = True
                log.warning("not telling Kubernetes: %s", self._disabled)
            return
        self._seen.add(container)
        if report.event == phase.value and "previous" in report.details:  # a phase change
            self._note_phase(container, phase)
        if (spec := st.event_for(container, report)) is not None:
            self._note_event(spec)
        self._kick()

    def _note_phase(self, container: str, phase: Phase) -> None:
        try:
            self._labels[st.phase_label(container)] = phase.value
        except st.KubeStatusError as exc:
            if container not in self._label_warned:
                self._label_warned.add(container)
                log.warning("container %s: %s", container, exc)
        if phase is Phase.SCALED_DOWN:
            self._want_lowered.add(container)
        else:
            self._want_lowered.discard(container)
            self._lowering_done.discard(container)
        if phase is Phase.STOPPED:
            self._stopped.add(container)
        else:
            self._stopped.discard(container)

    def _note_event(self, spec: st.EventSpec) -> None:
        now = self.clock()
        series = self._series.get(spec)
        if series is not None and now - series.last_seen <= st.SERIES_WINDOW:
            series.count += 1
            series.last_seen = now
        else:
            self._series[spec] = _Series(first_seen=now, last_seen=now)
        self._pending_events.pop(spec, None)
        self._pending_events[spec] = None  # the latest last
        for old in [
            s
            for s, series in self._series.items()
            if now - series.last_seen > st.SERIES_WINDOW and s not in self._pending_events
        ]:
            del self._series[old]
        while len(self._pending_events) > MAX_PENDING_EVENTS:
            dropped = next(iter(self._pending_events))
            del self._pending_events[dropped]
            log.warning("Kubernetes status: Event %s dropped, too many waiting", dropped.reason)

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kube-status")
        self._wake.set()

    # -- the background task -------------------------------------------------------

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let what is pending go out (at most `timeout`), then stop the task."""
        task = self._task
        if task is None or task.done():
            return
        self._closing = True
        self._wake.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            self._closing = False  # a later report starts the task again

    async def _run(self) -> None:
        try:
            if self._api is None:
                from activator.kube.api import ApiUnavailable

                try:
                    # lightkube loads here, in a thread: the event loop goes on.
                    self._api = await asyncio.to_thread(self._connect)
                except Exception as exc:
                    self._disabled = (
                        str(exc)
                        if isinstance(exc, ApiUnavailable)
                        else f"cannot set up the Kubernetes client: {exc!r}"
                    )
                    self._warned_disabled = True
                    log.warning(
                        "not telling Kubernetes (labels, Events, resize): %s", self._disabled
                    )
                    return
            while True:
                await self._wake.wait()
                if self.settle and not self._raise_due() and not self._closing:
                    await asyncio.sleep(self.settle)
                self._wake.clear()
                if self._retry is not None:
                    self._retry.cancel()
                    self._retry = None
                try:
                    retry = await self._round()
                except Exception:  # a bug: logged, and the next change tries again
                    log.exception("Kubernetes status: internal error")
                    retry = False
                # Closing: done once a round leaves nothing for the next (a
                # resize refused wakes it to write the record off).
                if self._closing and not self._wake.is_set():
                    return
                if self._seen and self._seen <= self._stopped and not retry:
                    return  # every container stopped: nothing more to say
                if retry:
                    self._retry = asyncio.get_running_loop().call_later(
                        self._backoff, self._wake.set
                    )
                    self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                else:
                    self._backoff = BACKOFF_FIRST
        finally:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            if self._api is not None:
                api, self._api = self._api, None
                with contextlib.suppress(Exception):
                    await api.close()

    def _raise_due(self) -> bool:
        """Requests to put back: a woken container's, or an earlier sidecar's."""
        return any(container not in self._want_lowered for container in self._saved)

    async def _round(self) -> bool:
        """One pass over everything pending; True if something should be retried."""
        from activator.kube.api import ApiFailure

        api = self._api
        assert api is not None
        retry = False
        if self._facts is None:
            try:
                self._learn(st.pod_facts(await api.get_pod()))
                self._ok("pod")
            except ApiFailure as exc:
                # Events go without the pod's uid meanwhile; resizing waits.
                self._failed("pod", exc)
                retry |= exc.transient
        retry |= await self._raise_requests()
        try:
            await self._sync_metadata()
            self._ok("labels")
        except ApiFailure as exc:
            self._failed("labels", exc)
            retry |= exc.transient
        if self._resize:
            for container in sorted(self._want_lowered - self._lowering_done):
                retry |= await self._lower_requests(container)
        await self._send_events()
        return retry

    def _learn(self, facts: st.PodFacts) -> None:
        self._facts = facts
        self._resize = st.resize_wanted(facts)
        for problem in facts.problems:
            log.warning("pod %s: %s", self.pod.name, problem)
        # An earlier sidecar lowered these: put back unless scaled down again.
        for container, requests in facts.saved.items():
            self._saved.setdefault(container, dict(requests))
        self._saved_sent = {k: dict(v) for k, v in facts.saved.items()}
        if facts.uid:
            self.pod = st.PodRef(self.pod.name, self.pod.namespace, facts.uid)

    async def _sync_metadata(self) -> None:
        """The labels that changed and the saved requests, in one merge patch."""
        assert self._api is not None
        labels = {k: v for k, v in self._labels.items() if self._labels_sent.get(k) != v}
        saved = None if self._saved == self._saved_sent else dict(self._saved)
        if not labels and saved is None:
            return
        await self._api.patch_pod(st.metadata_patch(labels, saved))
        self._labels_sent.update(labels)
        if saved is not None:
            self._saved_sent = {k: dict(v) for k, v in saved.items()}

    async def _raise_requests(self) -> bool:
        from activator.kube.api import ApiFailure

        assert self._api is not None
        retry = False
        for container in [n for n in self._saved if n not in self._want_lowered]:
            originals = self._saved[container]
            patch = st.resize_patch(container, originals)
            try:
                await self._api.resize(patch)
                self._ok("resize")
            except ApiFailure as exc:
                self._failed("resize", exc)
                if exc.transient:
                    retry = True
                    continue
                log.error(
                    "container %s: its requests stay lowered; put them back with: kubectl -n %s "
                    "patch pod %s --subresource resize --patch '%s'",
                    container,
                    self.pod.namespace,
                    self.pod.name,
                    _json(patch),
                )
            else:
                log.info("container %s: requests back to %s", container, _quantities(originals))
            del self._saved[container]
        return retry

    async def _lower_requests(self, container: str) -> bool:
        from activator.kube.api import ApiFailure

        assert self._api is not None
        try:
            # Read afresh: the requests may have changed since (a resize by
            # someone else), and the originals recorded must be today's.
            facts = st.pod_facts(await self._api.get_pod())
            self._ok("pod")
        except ApiFailure as exc:
            self._failed("pod", exc)
            return exc.transient
        if container not in self._want_lowered:  # woken meanwhile
            return False
        plan = st.plan_lowering(facts, container, self.floor)
        if isinstance(plan, str):
            self._lowering_done.add(container)
            log.info("container %s: requests not lowered while scaled down: %s", container, plan)
            return False
        self._saved[container] = dict(plan.originals)
        try:
            await self._sync_metadata()  # on record before they go down
            self._ok("labels")
        except ApiFailure as exc:
            del self._saved[container]
            self._failed("labels", exc)
            if not exc.transient:
                self._lowering_done.add(container)
            return exc.transient
        if container not in self._want_lowered:  # woken meanwhile: nothing went down
            del self._saved[container]
            self._wake.set()  # the next round writes the record off
            return False
        try:
            await self._api.resize(st.resize_patch(container, plan.lowered))
            self._ok("resize")
        except ApiFailure as exc:
            del self._saved[container]  # the next round writes the record off
            self._failed("resize", exc)
            if not exc.transient:
                self._lowering_done.add(container)
            self._wake.set()
            return exc.transient
        self._lowering_done.add(container)
        log.info(
            "container %s: requests lowered to %s while scaled down (were %s)",
            container,
            _quantities(plan.lowered),
            _quantities(plan.originals),
        )
        return False

    async def _send_events(self) -> None:
        from activator.kube.api import ApiFailure

        assert self._api is not None
        while self._pending_events:
            spec = next(iter(self._pending_events))
            del self._pending_events[spec]
            series = self._series.get(spec)
            if series is None:
                continue
            try:
                if series.name is not None:
                    try:
                        await self._api.patch_event(
                            series.name,
                            {"series": st.series_body(series.count, series.last_seen)},
                        )
                    except ApiFailure as exc:
                        if exc.status != 404:
                            raise
                        # The Event expired (the API server keeps them an
                        # hour): a new one starts from this sighting.
                        series.first_seen, series.count, series.name = series.last_seen, 1, None
                if series.name is None:
                    name = st.event_name(self.pod.name, self._unique())
                    await self._api.create_event(
                        st.event_body(
                            spec,
                            self.pod,
                            name,
                            instance=self.pod.name,
                            first_seen=series.first_seen,
                            series=(series.count, series.last_seen) if series.count > 1 else None,
                        )
                    )
                    series.name = name
                series.sent = series.count
                self._ok("events")
            except ApiFailure as exc:
                # Events are news: not retried. The series starts again with
                # the next sighting, counting the ones missed.
                series.name = None
                self._failed("events", exc)

    def _unique(self) -> int:
        self._last_unique = max(time.time_ns(), self._last_unique + 1)
        return self._last_unique

    # -- failures: the first of a kind is a warning, its repeats debug -------------

    def _failed(self, kind: str, exc: ApiFailure) -> None:
        if kind in self._failing:
            log.debug("Kubernetes status: %s", exc)
            return
        self._failing.add(kind)
        log.warning("Kubernetes status: %s (the activator goes on without it)", exc)

    def _ok(self, kind: str) -> None:
        if kind in self._failing:
            self._failing.discard(kind)
            log.info("Kubernetes status: %s works again", _KINDS[kind])


_KINDS = {
    "pod": "reading the pod",
    "labels": "patching the pod's labels",
    "resize": "resizing the pod",
    "events": "creating Events",
}


def _in_cluster(pod: st.PodRef) -> KubeApi:
    from activator.kube.api import KubeApi

    return KubeApi.in_cluster(pod.name, pod.namespace)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _quantities(requests: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
