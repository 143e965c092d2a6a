"""The Dokku suites' host: a harness installation of the plugin, removed after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dokku.harness import DokkuHost


@pytest.fixture
def dokku() -> Iterator[DokkuHost]:
    host = DokkuHost()
    try:
        host.install()
        yield host
    finally:
        host.remove()
