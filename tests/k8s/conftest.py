"""Fixtures for tests against the real container runtime.

`containerd`: one private containerd for the session (tests/k8s/runtime.py),
its pause and app images imported. Installs the runtime with
scripts/setup-containerd when a piece is missing; skips only when this
machine cannot run containers at all (not root, no overlayfs or cgroups).

`pod`: a factory, `pod(*containers, name=None, annotations=None, labels=None)`,
running the app container alone by default; every pod it made is stopped
and removed at teardown, as kubelet deletes a pod, even when the test failed,
and the test fails if anything of a pod was left behind.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests.k8s.runtime import (
    REPO,
    Containerd,
    ContainerSpec,
    Pod,
    RuntimeUnavailable,
    kernel_problems,
    missing_tools,
)


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd, runc, namespaces, cgroups)")
    problems = kernel_problems()
    if problems:
        pytest.skip(f"this machine cannot run containers: {'; '.join(problems)}")
    if missing_tools():
        setup = subprocess.run(
            [REPO / "scripts/setup-containerd"], capture_output=True, text=True, check=False
        )
        if setup.returncode != 0:
            pytest.fail(f"scripts/setup-containerd failed:\n{setup.stderr[-3000:]}")
    try:
        runtime = Containerd()
        runtime.__enter__()
    except RuntimeUnavailable as e:
        pytest.skip(f"containerd cannot start here: {e}")
    try:
        yield runtime
    finally:
        runtime.close()


PodFactory = Callable[..., Pod]


@pytest.fixture
def pod(containerd: Containerd) -> Iterator[PodFactory]:
    made: list[Pod] = []
    serial = itertools.count(1)

    def make(
        *containers: ContainerSpec,
        name: str | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Pod:
        name = name or f"t{next(serial)}-{uuid.uuid4().hex[:6]}"
        p = containerd.run_pod(
            name,
            containers or (containerd.app_container(),),
            annotations=annotations,
            labels=labels,
        )
        made.append(p)
        return p

    yield make

    problems = []
    for p in made:
        try:
            p.stop(grace=1)
        except Exception as e:
            problems.append(f"stopping {p.name}: {e}")
        problems += [f"{p.name}: {left}" for left in p.leftovers()]
    if problems:
        pytest.fail("pods left behind: " + "; ".join(problems))
