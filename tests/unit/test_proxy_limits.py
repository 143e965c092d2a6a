"""The proxy's [proxy] settings: defaults, overrides, and the text of every refusal."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest

from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy.limits import Limits, LimitsError, RouteLimits, parse_limits, read_limits


def route(app: str, port: int, protocol: Protocol = Protocol.TCP) -> Route:
    backend = Backend("c", ip_address("172.17.0.2"), 5000)
    return Route(app, "web", RouteKey(4, protocol, port), 5000, (backend,))


def test_defaults_keep_udp_flows_well_inside_the_ephemeral_range() -> None:
    limits = parse_limits({})
    assert limits == Limits()
    assert limits.max_udp_flows * 4 <= 60999 - 32768 + 1  # a quarter of the default range
    assert limits.route.route_max_udp_flows < limits.max_udp_flows
    assert limits.route.route_max_tcp < limits.max_tcp  # one app cannot take every slot
    assert limits.route.udp_idle == 60.0


def test_settings_and_overrides_later_ones_win() -> None:
    data = {
        "proxy": {
            "max_tcp": 100,
            "route_max_tcp": 50,
            "tcp_idle": 30,
            "route": [
                {"app": "mail", "tcp_idle": 7200},
                {"app": "mail", "port": 25, "protocol": "tcp", "route_max_tcp": 10},
                {"app": "mail", "port": 25, "tcp_idle": 60.5},
            ],
        }
    }
    limits = parse_limits(data)
    assert limits.max_tcp == 100
    assert limits.for_route(route("web", 80)) == RouteLimits(route_max_tcp=50, tcp_idle=30.0)
    assert limits.for_route(route("mail", 587)).tcp_idle == 7200.0
    smtp = limits.for_route(route("mail", 25))
    assert (smtp.route_max_tcp, smtp.tcp_idle) == (10, 60.5)
    assert limits.for_route(route("mail", 25, Protocol.UDP)).route_max_tcp == 50
    assert isinstance(smtp.route_max_tcp, int)


def test_the_environment_udp_idle_is_only_a_default() -> None:
    assert parse_limits({}, udp_idle=5.0).route.udp_idle == 5.0
    assert parse_limits({"proxy": {"udp_idle": 9}}, udp_idle=5.0).route.udp_idle == 9.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"max_tcp": 0}, "proxy.max_tcp must be a positive number, not 0"),
        ({"max_tcp": 1.5}, "proxy.max_tcp must be a whole number, not 1.5"),
        ({"tcp_idle": "1h"}, "proxy.tcp_idle must be a positive number, not '1h'"),
        ({"tcp_idle": True}, "proxy.tcp_idle must be a positive number, not True"),
        ({"max_conns": 5}, "proxy.max_conns is not a known setting"),
        ({"route": {"app": "x"}}, "proxy.route must be an array of tables ([[proxy.route]])"),
        ({"route": [{"port": 25}]}, "proxy.route[0].app is required (the app name)"),
        ({"route": [{"app": "a", "port": 0}]}, "proxy.route[0].port must be a port number, not 0"),
        (
            {"route": [{"app": "a", "protocol": "sctp"}]},
            'proxy.route[0].protocol must be "tcp" or "udp", not \'sctp\'',
        ),
        ({"route": [{"app": "a", "max_tcp": 5}]}, "proxy.route[0].max_tcp is not a known setting"),
        ({"route": [{"app": "a", "udp_idle": -1}]}, "proxy.route[0].udp_idle must be a positive"),
    ],
)
def test_invalid_settings_are_named(section: dict[str, object], message: str) -> None:
    with pytest.raises(LimitsError) as info:
        parse_limits({"proxy": section})
    assert str(info.value).startswith(message)


def test_read_limits_from_a_file(tmp_path: Path) -> None:
    assert read_limits(None) == Limits()
    assert read_limits(tmp_path / "missing.toml") == Limits()
    path = tmp_path / "natports.toml"
    path.write_text('[backend]\ndefault = "proxy"\n\n[proxy]\nmax_udp_flows = 7\n')
    assert read_limits(path).max_udp_flows == 7
    path.write_text("[proxy\n")
    with pytest.raises(LimitsError, match=f"^{path}: "):
        read_limits(path)
    path.write_text("[proxy]\nmax_tcp = -1\n")
    with pytest.raises(LimitsError, match=f"^{path}: proxy.max_tcp must be a positive number"):
        read_limits(path)
    path.write_text("proxy = 3\n")
    with pytest.raises(LimitsError, match=r"\[proxy\] must be a table"):
        read_limits(path)
