"""Which public ports apps may claim: cross-app conflicts and the operator's host policy.

Pure functions; the listeners on the host and the policy file are read by the callers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_section
from .errors import InputError
from .model import PORT_MAX, PORT_MIN, IPAddress, Mapping, Protocol, host_text
from .spec import ClaimIndex, Located, SpecError

_RANGE_RE = re.compile(r"^([0-9]+)(?:-([0-9]+))?(?:/(tcp|udp))?$")


@dataclass(frozen=True)
class PortRange:
    start: int
    end: int
    protocol: Protocol | None = None  # None: both

    def covers(self, protocol: Protocol, port: int) -> bool:
        return (self.protocol in (None, protocol)) and self.start <= port <= self.end

    @classmethod
    def parse(cls, text: str) -> PortRange:
        match = _RANGE_RE.match(text.strip())
        if not match:
            raise ValueError(f'"{text}" is not PORT[-END][/tcp|/udp]')
        start = int(match.group(1))
        end = int(match.group(2) or start)
        if not (PORT_MIN <= start <= end <= PORT_MAX):
            raise ValueError(f'"{text}" is not a port range within {PORT_MIN}-{PORT_MAX}')
        proto = match.group(3)
        return cls(start, end, None if proto is None else Protocol(proto))


# The services every Dokku host runs: SSH (git push), and nginx on 80/443 (ACME
# challenges included). Reserved even while nginx is down, when no listener shows it:
# once routed at priority -110, natports would win over nginx for good.
RESERVED = (PortRange(22, 22), PortRange(80, 80), PortRange(443, 443))


@dataclass(frozen=True)
class Policy:
    """The operator's limits. The defaults protect SSH, HTTP(S) and every port a host
    process serves."""

    deny: tuple[PortRange, ...] = ()  # the operator's own list, on top of `reserved`
    allow: tuple[PortRange, ...] | None = None  # None: any port not denied
    allow_listening: tuple[PortRange, ...] = field(default=())
    reserved: tuple[PortRange, ...] = RESERVED  # the operator may narrow it (no nginx)

    @property
    def refused(self) -> tuple[PortRange, ...]:
        return self.reserved + self.deny


@dataclass(frozen=True)
class HostListener:
    """A host socket that accepts on a port (TCP LISTEN, or a bound unconnected UDP socket)."""

    protocol: Protocol
    ip: IPAddress
    port: int
    process: str  # "sshd (pid 412)", or "unknown process" when /proc does not tell

    def shadowed_by(self, mapping: Mapping, port: int) -> bool:
        if self.protocol != mapping.protocol or self.port != port or self.ip.is_loopback:
            return False
        if mapping.public_ip is None or self.ip.is_unspecified:
            return True
        return self.ip == mapping.public_ip


def load_policy(path: Path) -> Policy:
    """Read `[policy]` from the operator's TOML config; a missing file means the defaults."""
    section = read_section(path, "policy")
    problems: list[str] = []

    def ranges(key: str) -> tuple[PortRange, ...] | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            problems.append(f"{path}: policy.{key} must be a list of port ranges")
            return None
        parsed: list[PortRange] = []
        for item in value:
            try:
                parsed.append(PortRange.parse(str(item)))
            except ValueError as exc:
                problems.append(f"{path}: policy.{key}: {exc}")
        return tuple(parsed)

    unknown = sorted(set(section) - {"deny", "allow", "allow_listening", "reserved"})
    for key in unknown:
        problems.append(f"{path}: policy.{key} is not a known setting")
    deny = ranges("deny")
    allow = ranges("allow")
    allow_listening = ranges("allow_listening")
    reserved = ranges("reserved")
    if problems:
        raise InputError(problems)
    return Policy(
        deny=deny or (),
        allow=allow,
        allow_listening=allow_listening or (),
        reserved=RESERVED if reserved is None else reserved,
    )


def check_conflicts(
    app: str, located: Sequence[Located], others: dict[str, tuple[Mapping, ...]]
) -> list[SpecError]:
    """A public (address, port, protocol) belongs to one app only.

    Each clash names the alphabetically first other app holding an overlapping port, and
    that app's first such mapping. O((n + m) log P): the other apps' m claims go into
    segment trees ranked in that order, and each of the n lines asks for the smallest
    rank over its ports (wildcard claims, claims on its own address).
    """
    ranked: list[tuple[str, Mapping]] = []
    claims = ClaimIndex()
    for other_app, mappings in sorted(others.items()):
        if other_app == app:
            continue
        for m in mappings:
            claims.add(m, len(ranked))
            ranked.append((other_app, m))
    errors: list[SpecError] = []
    for loc in located:
        m = loc.mapping
        first = claims.first(m)
        if first is not None:
            other_app, clash = ranked[first]
            errors.append(
                SpecError(
                    loc.line,
                    loc.col,
                    f'app "{app}": port {_shared(m, clash)} is already mapped by app "{other_app}"',
                )
            )
    return errors


def check_policy(
    located: Sequence[Located], policy: Policy, listeners: Iterable[HostListener]
) -> list[SpecError]:
    listeners = list(listeners)
    errors: list[SpecError] = []
    for loc in located:
        problem = _policy_problem(loc.mapping, policy, listeners)
        if problem:
            errors.append(SpecError(loc.line, loc.col, problem))
    return errors


def _policy_problem(mapping: Mapping, policy: Policy, listeners: list[HostListener]) -> str | None:
    proto = mapping.protocol
    for public, _ in mapping.ports():
        if any(r.covers(proto, public) for r in policy.refused):
            return f"port {public}/{proto} is reserved by the host policy"
        if policy.allow is not None and not any(r.covers(proto, public) for r in policy.allow):
            return f"port {public}/{proto} is not in the host policy's allowed ports"
        if any(r.covers(proto, public) for r in policy.allow_listening):
            continue
        for listener in listeners:
            if listener.shadowed_by(mapping, public):
                return (
                    f"port {public}/{proto} is in use on the host: {listener.process} "
                    f"listens on {host_text(listener.ip)}:{public} (an operator can allow it "
                    "with policy.allow_listening)"
                )
    return None


def _shared(a: Mapping, b: Mapping) -> str:
    """The first public port two overlapping mappings share, as `[ip:]port/proto`."""
    port = max(a.public_port, b.public_port)
    ip = a.public_ip or b.public_ip
    host = "" if ip is None else f"{host_text(ip)}:"
    return f"{host}{port}/{a.protocol}"
