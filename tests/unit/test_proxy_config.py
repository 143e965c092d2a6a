"""The proxy backend's pure parts: config text, merging one app's switch, route ids."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path

import pytest

from natports.backends.proxy import ProxyBackend
from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy.config import (
    ConfigError,
    describe_key,
    merge_app,
    parse_config,
    render_config,
    route_id,
    write_atomically,
)
from natports.proxy.inherit import address_matches

TCP, UDP = Protocol.TCP, Protocol.UDP


def route(
    app: str,
    port: int,
    *backends: str,
    protocol: Protocol = TCP,
    family: int = 4,
    ip: str | None = None,
) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(family, protocol, port, None if ip is None else ip_address(ip)),
        private_port=5025,
        backends=tuple(Backend(f"c-{b}", ip_address(b), 5025) for b in backends),
    )


MAIL = route("mail", 25, "172.17.0.2")
MAIL6 = route("mail", 25, "fd00::2", family=6)
DNS = route("dns", 53, "172.17.0.3", protocol=UDP, ip="203.0.113.7")
CHAT = route("chat", 5222, "172.17.0.4", "172.17.0.5")


def test_route_ids_are_readable_and_unique_per_family() -> None:
    assert route_id(MAIL) == "mail/tcp/*/25"
    assert route_id(MAIL6) == "mail/tcp6/*/25"
    assert route_id(DNS) == "dns/udp/203.0.113.7/53"
    assert route_id(route("x", 995, protocol=TCP, family=6, ip="2001:db8::7")) == (
        "x/tcp6/2001:db8::7/995"
    )
    assert ProxyBackend(Path("/nonexistent")).route_id(CHAT) == "chat/tcp/*/5222"


def test_describe_key() -> None:
    assert describe_key(MAIL.key) == "*:25/tcp"
    assert describe_key(MAIL6.key) == "[::]:25/tcp"
    assert describe_key(DNS.key) == "203.0.113.7:53/udp"


def test_render_is_sorted_deterministic_and_parses_back() -> None:
    text = render_config([CHAT, DNS, MAIL6, MAIL])
    assert text == render_config([MAIL, MAIL6, DNS, CHAT])
    doc = json.loads(text)
    assert doc["version"] == 1
    # family, protocol, port: the order nft status and --dry-run use too
    assert [r["public_port"] for r in doc["routes"]] == [25, 5222, 53, 25]
    assert set(parse_config(text)) == {MAIL, MAIL6, DNS, CHAT}
    assert json.loads(render_config([]))["routes"] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"version": 2, "routes": []}', "version 1 expected"),
        ("[]", "not a natports proxy config"),
        ('{"version": 1, "routes": {}}', '"routes" must be a list'),
        ('{"version": 1, "routes": [7]}', "route 0 is not an object"),
        ('{"version": 1, "routes": [{"app": "x"}]}', "route 0 is invalid (KeyError"),
    ],
)
def test_parse_rejects_bad_configs(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


def test_parse_rejects_two_routes_on_one_key_and_bad_fields() -> None:
    twice = render_config([MAIL]).replace("[\n", "[\n" + json.dumps(MAIL.to_json()) + ",\n", 1)
    with pytest.raises(ConfigError, match=r"route 1: \*:25/tcp is already routed for mail"):
        parse_config(twice)
    doc = {"version": 1, "routes": [{**DNS.to_json(), "family": 6}]}
    with pytest.raises(ConfigError, match="not an IPv6 address"):
        parse_config(json.dumps(doc))
    doc = {"version": 1, "routes": [{**MAIL.to_json(), "public_port": 70000}]}
    with pytest.raises(ConfigError, match="out of range"):
        parse_config(json.dumps(doc))


def test_merge_app_replaces_only_that_apps_routes() -> None:
    current = (MAIL, MAIL6, DNS)
    mail_v2 = route("mail", 25, "172.17.0.9")
    merged = merge_app(current, previous=(MAIL, MAIL6), desired=(mail_v2,))
    assert set(merged) == {mail_v2, DNS}
    # removing an app
    assert set(merge_app(current, previous=(DNS,), desired=())) == {MAIL, MAIL6}
    # a first deploy: nothing previous
    assert set(merge_app(current, previous=(), desired=(CHAT,))) == {MAIL, MAIL6, DNS, CHAT}
    # previous routes of the app that the file no longer has are simply absent
    assert set(merge_app((DNS,), previous=(MAIL,), desired=(CHAT,))) == {DNS, CHAT}


def test_backend_plans_from_the_current_config_file(tmp_path: Path) -> None:
    backend = ProxyBackend(tmp_path)
    assert backend.current() == ()
    assert parse_config(backend.plan_app((), (MAIL,))) == (MAIL,)
    write_atomically(tmp_path / "proxy.json", render_config([MAIL, DNS]))
    assert (tmp_path / "proxy.json").stat().st_mode & 0o777 == 0o644
    mail_v2 = route("mail", 25, "172.17.0.9")
    assert set(parse_config(backend.plan_app((MAIL,), (mail_v2,)))) == {mail_v2, DNS}
    assert parse_config(backend.plan_reconcile([CHAT])) == (CHAT,)
    assert parse_config(backend.plan_flush_all()) == ()


def test_backend_reports_a_corrupt_config_file(tmp_path: Path) -> None:
    (tmp_path / "proxy.json").write_text("{not json")
    with pytest.raises(NatportsError, match="is corrupt"):
        ProxyBackend(tmp_path).plan_app((), (MAIL,))


def test_run_refuses_a_batch_that_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(NatportsError, match="not a proxy config"):
        ProxyBackend(tmp_path).run("add table inet natports\n")
    assert not (tmp_path / "proxy.json").exists()


@pytest.mark.parametrize(
    ("key", "family", "host", "v6only", "expected"),
    [
        (MAIL.key, 4, "0.0.0.0", False, True),
        (MAIL.key, 4, "198.51.100.1", False, False),
        (MAIL.key, 6, "::", False, True),  # a dual-stack [::] socket serves IPv4 too
        (MAIL.key, 6, "::", True, False),
        (MAIL6.key, 6, "::", True, True),
        (MAIL6.key, 4, "0.0.0.0", False, False),
        (DNS.key, 4, "203.0.113.7", False, True),
        (DNS.key, 4, "0.0.0.0", False, False),
    ],
)
def test_inherited_sockets_match_routes_by_address(
    key: RouteKey, family: int, host: str, v6only: bool, expected: bool
) -> None:
    assert address_matches(key, family, host, key.public_port, v6only) is expected
    assert address_matches(key, family, host, key.public_port + 1, v6only) is False
