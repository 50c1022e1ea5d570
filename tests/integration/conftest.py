"""Fixtures shared by the integration tests that run real servers in pods."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.servers import Scratch


@pytest.fixture(scope="session")
def scratch() -> Iterator[Scratch]:
    """Initialised data dirs (MariaDB, PostgreSQL) made once, and dirs other users reach."""
    made = Scratch()
    yield made
    made.close()
