"""The sidecar's API calls, through lightkube's async client.

Five calls, each on the sidecar's own pod or its Events, each allowed by the
ClusterRole in deploy/base/rbac.yaml (the verb, group and resource are in
each method's docstring). Every failure comes out as an `ApiFailure` that
says what failed, why, what to do, and whether trying again may help.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.core_v1 import Pod, PodResize
from lightkube.resources.events_v1 import Event
from lightkube.types import PatchType

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "pod-activator-sidecar"
# Every call is off the lifecycle's paths, but a hung API server must not
# hold back the calls after it for long.
TIMEOUT = 5.0
# Statuses worth trying again: conflicts, throttling, the server's own trouble.
_TRANSIENT = {409, 429, 500, 502, 503, 504}


class ApiUnavailable(Exception):
    """There is no API server to talk to (no ServiceAccount token mounted, say)."""


class ApiFailure(Exception):
    def __init__(
        self, what: str, problem: str, fix: str = "", *, transient: bool, status: int | None = None
    ) -> None:
        self.what = what
        self.problem = problem
        self.fix = fix
        self.transient = transient
        self.status = status  # the HTTP status, when the API server answered
        super().__init__(f"{what}: {problem}" + (f"; {fix}" if fix else ""))


class KubeApi:
    """The calls about pod `pod` in `namespace` (the sidecar's own)."""

    def __init__(self, client: AsyncClient, pod: str, namespace: str, server: str) -> None:
        self.client = client
        self.pod = pod
        self.namespace = namespace
        self.server = server

    @classmethod
    def in_cluster(
        cls, pod: str, namespace: str, service_account: Path = SERVICE_ACCOUNT
    ) -> KubeApi:
        """As the pod's ServiceAccount, at the API server the kubelet names in
        KUBERNETES_SERVICE_HOST/PORT; raises ApiUnavailable."""
        try:
            config = KubeConfig.from_service_account(service_account)
        except (ConfigError, KeyError, OSError) as exc:
            raise ApiUnavailable(
                f"no ServiceAccount token in {service_account} or no KUBERNETES_SERVICE_HOST "
                f"({exc!r}): let the pod mount its token (automountServiceAccountToken)"
            ) from exc
        cluster = config.get()
        if cluster is None:  # from_service_account always sets one
            raise ApiUnavailable("the ServiceAccount gives no cluster")
        client = AsyncClient(
            config,
            namespace=namespace,
            timeout=httpx2.Timeout(TIMEOUT),
            field_manager=FIELD_MANAGER,
        )
        return cls(client, pod, namespace, cluster.cluster.server)

    async def close(self) -> None:
        await self.client.close()

    async def get_pod(self) -> dict[str, Any]:
        """GET pods (core): the pod's uid, annotations, requests, QoS class."""
        try:
            pod = await self.client.get(Pod, self.pod, namespace=self.namespace)
        except Exception as exc:
            raise self._failure("reading the pod", exc, {404: "the pod is gone"}) from exc
        found: dict[str, Any] = pod.to_dict()
        return found

    async def patch_pod(self, patch: Mapping[str, Any]) -> None:
        """PATCH pods (core), a JSON merge patch: labels and annotations."""
        try:
            await self.client.patch(
                Pod, self.pod, dict(patch), namespace=self.namespace, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            raise self._failure("patching the pod's labels", exc, {404: "the pod is gone"}) from exc

    async def resize(self, patch: Mapping[str, Any]) -> None:
        """PATCH pods/resize (core), a strategic merge patch of requests."""
        try:
            await self.client.patch(
                PodResize,
                self.pod,
                dict(patch),
                namespace=self.namespace,
                patch_type=PatchType.STRATEGIC,
            )
        except Exception as exc:
            raise self._failure(
                "resizing the pod in place",
                exc,
                {
                    404: "no pods/resize here (Kubernetes before 1.33) or the pod is gone: "
                    "remove the annotation pod-activator.dev/resize-when-scaled-down"
                },
            ) from exc

    async def create_event(self, body: Mapping[str, Any]) -> None:
        """POST events (events.k8s.io)."""
        try:
            # The namespace is the body's (metadata.namespace), as the URL's.
            await self.client.create(cast(Event, Event.from_dict(dict(body))))
        except Exception as exc:
            raise self._failure("creating an Event", exc) from exc

    async def patch_event(self, name: str, patch: Mapping[str, Any]) -> None:
        """PATCH events (events.k8s.io), a JSON merge patch: a series' count."""
        try:
            await self.client.patch(
                Event, name, dict(patch), namespace=self.namespace, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            raise self._failure(
                "counting a repeated Event", exc, {404: "the Event expired"}
            ) from exc

    def _failure(
        self, what: str, exc: Exception, meaning: Mapping[int, str] | None = None
    ) -> ApiFailure:
        where = f"{what} (pod {self.namespace}/{self.pod})"
        if isinstance(exc, httpx2.HTTPStatusError):
            status = exc.response.status_code
            message = exc.status.message if isinstance(exc, ApiError) else exc.response.text[:200]
            fix = (meaning or {}).get(status, "")
            if status == 403:
                fix = (
                    "bind the ClusterRole pod-activator-sidecar to the pod's ServiceAccount "
                    f"in namespace {self.namespace} (deploy/README.md, RBAC)"
                )
            elif status == 401:
                fix = "the ServiceAccount token was refused: is it expired or revoked?"
            return ApiFailure(
                where,
                f"HTTP {status}: {message}",
                fix,
                transient=status in _TRANSIENT,
                status=status,
            )
        if isinstance(exc, httpx2.TransportError):
            return ApiFailure(
                where,
                f"cannot reach the API server at {self.server}: {exc!r}",
                transient=True,
            )
        if isinstance(exc, ConfigError | OSError):
            return ApiFailure(where, f"{exc}", "check the ServiceAccount token", transient=True)
        # An answer we cannot read (lightkube's decoding): no use repeating it.
        return ApiFailure(where, f"unexpected: {exc!r}", transient=False)
