"""The e2e client and containers follow the test's address family (`family`, 4 by default).

v4: the v4 client netns and Docker's default bridge, as always. v6: a client netns that
has only IPv6 (nothing can fall back to v4) and containers started on the tests'
dual-stack network, as Dokku starts them on `network:set APP initial-network`.
"""

from __future__ import annotations

import pytest

from tests.infra import ClientNet, Containers


@pytest.fixture
def client_net(client_net: ClientNet, family: int, request: pytest.FixtureRequest) -> ClientNet:
    if family == 4:
        return client_net
    net: ClientNet = request.getfixturevalue("client_net6")
    return net


@pytest.fixture
def containers(containers: Containers, family: int, request: pytest.FixtureRequest) -> Containers:
    if family == 6:
        containers.network = request.getfixturevalue("dual_network")
    return containers
