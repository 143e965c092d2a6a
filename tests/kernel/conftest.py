"""Shared by the kernel tests: backends on the host itself, so no Docker is needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.infra import ClientNet, TagServer


@pytest.fixture
def servers(client_net: ClientNet) -> Iterator[list[TagServer]]:
    made = [TagServer(client_net.host_ip, tag) for tag in ("one", "two")]
    yield made
    for server in made:
        server.close()
