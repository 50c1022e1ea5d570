"""What Kubernetes is told, as data: labels, Events and resizes from reports.

Pure: reports and the pod's JSON in, the JSON bodies the API server takes
out. reporter.py decides when they are sent, api.py sends them.

- **Labels**: `phase.pod-activator.dev/<container>: <phase>` per managed
  container (`kubectl get pods -l phase.pod-activator.dev/web=scaled-down`).
  The container's name is the label's whole name part, behind a prefix of
  its own: a container name is a DNS label (at most 63 characters), so it
  always fits, never needs shortening, and cannot collide with our other
  labels (`pod-activator.dev/inject`).
- **Events** (events.k8s.io/v1) regarding the pod, with the container as
  `fieldPath`: ScaledDown, Woken, CheckpointFailed, RestoreFailed. An event
  that repeats within SERIES_WINDOW is counted in the first one's `series`
  (as client-go does), not created again; its note cannot change (the API
  server keeps a v1 Event's note immutable), so the note is part of what
  makes two events the same, and the notes of ScaledDown and Woken carry no
  timings (the metrics have them).
- **Resize**: while a container is scaled down its requests go down to a
  floor through `pods/resize` (strategic merge patch naming only that
  container's requests); the originals are kept in the pod's annotation
  SAVED_REQUESTS, so that a restarted sidecar still puts them back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from activator import annotations as pod_annotations
from activator import commands as c

PHASE_LABEL_PREFIX = "phase.pod-activator.dev/"
SAVED_REQUESTS = pod_annotations.OURS + "requests-before-scale-down"
REPORTING_CONTROLLER = "pod-activator.dev/sidecar"
# The API server's limits for events.k8s.io/v1 (validation of Event).
NOTE_LIMIT = 1024  # bytes
REPORTING_INSTANCE_LIMIT = 128
# An event seen again within this long after its last sighting joins its
# series (client-go's events recorder finishes a series after 6 minutes).
SERIES_WINDOW = 6 * 60.0
# Requests that a resize may change (the API refuses any other).
RESIZABLE = ("cpu", "memory")

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{s: Decimal(1024**i) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
}


class KubeStatusError(ValueError):
    """Something cannot be said to the API server as it is; the message says why."""


# -- labels --------------------------------------------------------------------


def phase_label(container: str) -> str:
    """The label that carries `container`'s phase."""
    if not _LABEL_NAME.match(container):
        raise KubeStatusError(
            f"container name {container!r} cannot name a label (at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit): "
            "its phase is not labelled; name the container as Kubernetes requires"
        )
    return PHASE_LABEL_PREFIX + container


def metadata_patch(
    labels: Mapping[str, str], saved: Mapping[str, Mapping[str, str]] | None
) -> dict[str, Any]:
    """A JSON merge patch of the pod's metadata: these labels, and the saved
    requests (None: leave the annotation alone; empty: remove it)."""
    for value in labels.values():
        if not _LABEL_NAME.match(value):
            raise KubeStatusError(f"{value!r} is not a valid label value")
    metadata: dict[str, Any] = {}
    if labels:
        metadata["labels"] = dict(labels)
    if saved is not None:
        text = json.dumps(saved, sort_keys=True, separators=(",", ":")) if saved else None
        metadata["annotations"] = {SAVED_REQUESTS: text}
    return {"metadata": metadata}


# -- events --------------------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    name: str
    namespace: str
    uid: str | None = None


@dataclass(frozen=True)
class EventSpec:
    """One Event about a container; equal specs are one series."""

    container: str
    type: Literal["Normal", "Warning"]
    reason: str
    action: str
    note: str


def event_for(container: str, report: c.Report) -> EventSpec | None:
    """The Event a report makes, if any."""
    match report.event:
        case "scaled-down":
            return EventSpec(
                container,
                "Normal",
                "ScaledDown",
                "Checkpoint",
                f"container {container} checkpointed: scaled down until the next connection",
            )
        case "running" if report.details.get("previous") == "restoring":
            return EventSpec(
                container,
                "Normal",
                "Woken",
                "Restore",
                f"container {container} restored from its checkpoint: running",
            )
        case "checkpoint-failed":
            return EventSpec(
                container,
                "Warning",
                "CheckpointFailed",
                "Checkpoint",
                clip_note(f"container {container}: {report.message}"),
            )
        case "restore-failed":
            return EventSpec(
                container,
                "Warning",
                "RestoreFailed",
                "Restore",
                clip_note(f"container {container}: {report.message}"),
            )
    return None


def clip_note(text: str, limit: int = NOTE_LIMIT) -> str:
    """`text` in at most `limit` bytes of UTF-8: its first line and as much of
    its end as fits (a failure's message ends with the tail of CRIU's log,
    where the cause is)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    marker = b"\n  [...]\n"
    head = text.splitlines()[0].encode()[: limit // 4]
    room = limit - len(head) - len(marker)
    tail = data[-room:]
    # A cut inside a UTF-8 sequence drops the partial character.
    return (head.decode(errors="ignore") + marker.decode() + tail.decode(errors="ignore")).rstrip(
        "\ufffd"
    )


def micro_time(unix: float) -> str:
    """A MicroTime as the API server parses it: RFC 3339 with exactly six
    fractional digits (Go's time.Parse with RFC3339Micro)."""
    moment = datetime.fromtimestamp(unix, UTC)
    # lightkube's encoder writes a datetime whose microsecond is 0 without a
    # fraction, which the API server then refuses: never hand it one.
    if moment.microsecond == 0:
        moment = moment.replace(microsecond=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_name(pod: str, unique: int) -> str:
    """Named as client-go names events: the object's name, a dot, a hex number."""
    return f"{pod[:230]}.{unique:x}"


def event_body(
    spec: EventSpec,
    pod: PodRef,
    name: str,
    instance: str,
    first_seen: float,
    series: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """The events.k8s.io/v1 Event to create; `series` is (count, last seen)."""
    regarding: dict[str, str] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod.name,
        "namespace": pod.namespace,
        "fieldPath": f"spec.containers{{{spec.container}}}",
    }
    if pod.uid:  # `kubectl describe pod` finds a pod's events by its uid
        regarding["uid"] = pod.uid
    body: dict[str, Any] = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": pod.namespace},
        "eventTime": micro_time(first_seen),
        "type": spec.type,
        "reason": spec.reason,
        "action": spec.action,
        "note": clip_note(spec.note),
        "regarding": regarding,
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance[:REPORTING_INSTANCE_LIMIT],
    }
    if series is not None:
        body["series"] = series_body(*series)
    return body


def series_body(count: int, last_seen: float) -> dict[str, Any]:
    if count < 2:
        raise KubeStatusError(f"a series counts at least 2 events, not {count}")
    return {"count": count, "lastObservedTime": micro_time(last_seen)}


# -- resize --------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeFloor:
    """The requests of a scaled-down container; None leaves one unchanged.

    CPU goes to 1m, the least the API takes: a checkpointed app uses none
    (the holder sleeps in poll). Memory stays by default: the kubelet evicts
    first the pods that use more memory than they request, and on wake the
    restored app is back at its full size before its requests are (the wake
    does not wait for the API server), on a node that may have given the
    freed memory to another pod meanwhile (the resize up is then deferred).
    A request already at or below the floor is left as it is.
    """

    cpu: str | None = "1m"
    memory: str | None = None


@dataclass(frozen=True)
class ContainerFacts:
    requests: Mapping[str, str]
    # Resources whose resize restarts the container (resizePolicy
    # RestartContainer): a restart would lose the checkpointed app.
    restarts_on: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PodFacts:
    """What the sidecar reads of its pod from the API server."""

    uid: str | None
    annotations: Mapping[str, str]
    qos_class: str | None
    containers: Mapping[str, ContainerFacts]
    # container -> its requests before a scale-down lowered them
    saved: Mapping[str, Mapping[str, str]]
    problems: tuple[str, ...] = field(default=())


def pod_facts(pod: Mapping[str, Any]) -> PodFacts:
    metadata = pod.get("metadata") or {}
    annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
    containers: dict[str, ContainerFacts] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        containers[container["name"]] = ContainerFacts(
            requests={str(k): str(v) for k, v in (resources.get("requests") or {}).items()},
            restarts_on=frozenset(
                policy["resourceName"]
                for policy in container.get("resizePolicy") or []
                if policy.get("restartPolicy") == "RestartContainer"
            ),
        )
    saved, problems = _saved_requests(annotations.get(SAVED_REQUESTS))
    return PodFacts(
        uid=metadata.get("uid"),
        annotations=annotations,
        qos_class=(pod.get("status") or {}).get("qosClass"),
        containers=containers,
        saved=saved,
        problems=problems,
    )


def _saved_requests(
    text: str | None,
) -> tuple[dict[str, dict[str, str]], tuple[str, ...]]:
    if text is None:
        return {}, ()
    try:
        loaded = json.loads(text)
        saved = {
            str(container): {str(r): str(q) for r, q in requests.items() if r in RESIZABLE}
            for container, requests in loaded.items()
        }
    except (ValueError, AttributeError) as exc:
        return {}, (
            f"annotation {SAVED_REQUESTS} is not the JSON the sidecar writes ({exc}): "
            "requests lowered by an earlier sidecar are not put back; check them",
        )
    return saved, ()


def resize_wanted(facts: PodFacts) -> bool:
    """Whether the pod asks for resizing while scaled down (a bad annotation: no)."""
    try:
        return pod_annotations.parse(facts.annotations).resize_when_scaled_down
    except ValueError:
        return False  # the sidecar already reported the pod's bad annotations


@dataclass(frozen=True)
class Lowering:
    container: str
    originals: Mapping[str, str]
    lowered: Mapping[str, str]


def plan_lowering(facts: PodFacts, container: str, floor: ResizeFloor) -> Lowering | str:
    """How to lower `container`'s requests, or why not to (a sentence)."""
    found = facts.containers.get(container)
    if found is None:
        return f"the pod has no container {container}"
    if facts.qos_class == "Guaranteed":
        return (
            "the pod's QoS class is Guaranteed (requests equal limits): lower "
            "requests would change it, which a resize may not"
        )
    originals: dict[str, str] = {}
    lowered: dict[str, str] = {}
    kept: list[str] = []
    for resource in RESIZABLE:
        target = getattr(floor, resource)
        current = found.requests.get(resource)
        if target is None or current is None:
            continue
        if resource in found.restarts_on:
            kept.append(f"{resource} (its resizePolicy restarts the container)")
            continue
        if parse_quantity(current) <= parse_quantity(target):
            continue
        originals[resource] = current
        lowered[resource] = target
    if not lowered:
        return "nothing to lower" + (": kept " + ", ".join(kept) if kept else "")
    return Lowering(container, originals, lowered)


def resize_patch(container: str, requests: Mapping[str, str]) -> dict[str, Any]:
    """A strategic merge patch for pods/resize: this container's requests,
    nothing else (containers merge by name; the others stay as they are)."""
    unknown = sorted(set(requests) - set(RESIZABLE))
    if unknown:
        raise KubeStatusError(f"a resize changes only cpu and memory, not {', '.join(unknown)}")
    return {
        "spec": {"containers": [{"name": container, "resources": {"requests": dict(requests)}}]}
    }


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("500m", "1.5", "64Mi", "1e3") as a number."""
    found = _QUANTITY.match(text.strip())
    if found is None:
        raise KubeStatusError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = found.group(1), found.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIX[suffix]
    except InvalidOperation as exc:
        raise KubeStatusError(f"{text!r} is not a Kubernetes quantity") from exc
