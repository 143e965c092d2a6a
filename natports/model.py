"""The plain data the whole engine works on; every type here is frozen."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

IPAddress = IPv4Address | IPv6Address

PORT_MIN = 1
PORT_MAX = 65535
DEFAULT_PROCESS_TYPE = "web"
PROXY_PROTOCOL_OPTION = "proxy-protocol"  # the PORTS word that asks for a PROXY v2 header

# Dokku's rule for existing app names, length-capped. New apps get `^[a-z0-9][a-z0-9.-]*$`,
# but older apps may contain `_` and stay valid (Dokku v0.38.27 plugins/common/common.go:
# 1023-1028 IsValidAppNameOld, used by VerifyAppName at :1070). Every name derived from an
# app name (state files, nft chains, labels) must accept all of these characters.
APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
# Procfile process type names.
PROCESS_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


def is_valid_app_name(name: str) -> bool:
    return bool(APP_NAME_RE.fullmatch(name))


def loopback_publish(private_port: int, protocol: Protocol, end: int | None = None) -> str:
    """Docker's `-p` value that publishes a private port (or range) on loopback."""
    ports = str(private_port) if end is None or end == private_port else f"{private_port}-{end}"
    return f"127.0.0.1::{ports}{'/udp' if protocol is Protocol.UDP else ''}"


def host_text(ip: IPAddress) -> str:
    """An address as it stands before `:port`: IPv6 in brackets."""
    return f"[{ip}]" if ip.version == 6 else str(ip)


@dataclass(frozen=True, order=True)
class Mapping:
    """One PORTS line: `count` consecutive public ports onto as many private ports."""

    public_port: int
    private_port: int
    protocol: Protocol = Protocol.TCP
    count: int = 1
    public_ip: IPAddress | None = None
    process_type: str = DEFAULT_PROCESS_TYPE
    # PROXY protocol v2 header towards the app (userspace proxy backend only).
    proxy_protocol: bool = False

    @property
    def public_end(self) -> int:
        return self.public_port + self.count - 1

    @property
    def private_end(self) -> int:
        return self.private_port + self.count - 1

    def ports(self) -> list[tuple[int, int]]:
        """(public, private) for every port of the range."""
        return [(self.public_port + i, self.private_port + i) for i in range(self.count)]

    def _host(self) -> str:
        return "" if self.public_ip is None else f"{host_text(self.public_ip)}:"

    def public_text(self) -> str:
        """The public side as an operator writes it: `[ip:]port[-end]/proto`."""
        host = self._host()
        ports = str(self.public_port)
        if self.count > 1:
            ports += f"-{self.public_end}"
        return f"{host}{ports}/{self.protocol}"

    def to_line(self) -> str:
        """The canonical PORTS line for this mapping (parses back to an equal Mapping)."""
        host = self._host()
        pub = str(self.public_port)
        priv = str(self.private_port)
        if self.count > 1:
            pub += f"-{self.public_end}"
            priv += f"-{self.private_end}"
        prefix = "" if self.process_type == DEFAULT_PROCESS_TYPE else f"{self.process_type}: "
        option = f" {PROXY_PROTOCOL_OPTION}" if self.proxy_protocol else ""
        return f"{prefix}{host}{pub}:{priv}/{self.protocol}{option}"

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "process_type": self.process_type,
            "protocol": str(self.protocol),
            "public_ip": None if self.public_ip is None else str(self.public_ip),
            "public_port": self.public_port,
            "private_port": self.private_port,
            "count": self.count,
        }
        if self.proxy_protocol:  # only when set: documents without it stay as they were
            doc["proxy_protocol"] = True
        return doc

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Mapping:
        ip = data.get("public_ip")
        return cls(
            public_port=int(str(data["public_port"])),
            private_port=int(str(data["private_port"])),
            protocol=Protocol(str(data["protocol"])),
            count=int(str(data.get("count", 1))),
            public_ip=None if ip is None else ip_address(str(ip)),
            process_type=str(data.get("process_type", DEFAULT_PROCESS_TYPE)),
            proxy_protocol=data.get("proxy_protocol") is True,
        )


@dataclass(frozen=True, order=True)
class Backend:
    """One place a new flow may be sent: a container address and its private port."""

    container_id: str
    ip: IPAddress
    port: int

    def to_json(self) -> dict[str, object]:
        return {"container_id": self.container_id, "ip": str(self.ip), "port": self.port}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Backend:
        return cls(str(data["container_id"]), ip_address(str(data["ip"])), int(str(data["port"])))


@dataclass(frozen=True)
class RouteKey:
    """What a new flow is matched on; unique across all apps on a host."""

    family: int  # 4 or 6: the address family of the traffic this route DNATs
    protocol: Protocol
    public_port: int
    public_ip: IPAddress | None = None
    count: int = 1  # a range: public_port .. public_port + count - 1, one route, one key

    @property
    def public_end(self) -> int:
        return self.public_port + self.count - 1

    def sort_key(self) -> tuple[int, str, int, str]:
        """A total order (None and addresses do not compare with each other)."""
        return (self.family, str(self.protocol), self.public_port, str(self.public_ip or ""))


@dataclass(frozen=True)
class Route:
    """One public port of one app, and where its new flows go."""

    app: str
    process_type: str
    key: RouteKey
    private_port: int
    backends: tuple[Backend, ...] = field(default=())
    # Subnets of the backends' networks: flows from there back to them need masquerade.
    hairpin_subnets: tuple[str, ...] = field(default=())
    proxy_protocol: bool = False  # see Mapping.proxy_protocol

    def sort_key(self) -> tuple[int, str, int, str]:
        return self.key.sort_key()

    @property
    def private_end(self) -> int:
        return self.private_port + self.key.count - 1

    def claim(self) -> Mapping:
        """The public side this route occupies, as a mapping (for conflict checks)."""
        return Mapping(
            public_port=self.key.public_port,
            private_port=self.private_port,
            protocol=self.key.protocol,
            count=self.key.count,
            public_ip=self.key.public_ip,
            process_type=self.process_type,
        )

    def expanded(self) -> tuple[Route, ...]:
        """One single-port route per port of a range (for backends that serve port by port)."""
        if self.key.count == 1:
            return (self,)
        return tuple(
            replace(
                self,
                key=replace(self.key, public_port=self.key.public_port + i, count=1),
                private_port=self.private_port + i,
                backends=tuple(replace(b, port=b.port + i) for b in self.backends),
            )
            for i in range(self.key.count)
        )

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "app": self.app,
            "process_type": self.process_type,
            "family": self.key.family,
            "protocol": str(self.key.protocol),
            "public_ip": None if self.key.public_ip is None else str(self.key.public_ip),
            "public_port": self.key.public_port,
            "private_port": self.private_port,
            "backends": [b.to_json() for b in self.backends],
            "hairpin_subnets": list(self.hairpin_subnets),
            **({"count": self.key.count} if self.key.count > 1 else {}),
        }
        if self.proxy_protocol:  # only when set: state files without it stay as they were
            doc["proxy_protocol"] = True
        return doc

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Route:
        ip = data.get("public_ip")
        backends = data.get("backends", [])
        subnets = data.get("hairpin_subnets", [])
        assert isinstance(backends, list) and isinstance(subnets, list)
        return cls(
            app=str(data["app"]),
            process_type=str(data["process_type"]),
            key=RouteKey(
                family=int(str(data["family"])),
                protocol=Protocol(str(data["protocol"])),
                public_port=int(str(data["public_port"])),
                public_ip=None if ip is None else ip_address(str(ip)),
                count=int(str(data.get("count", 1))),
            ),
            private_port=int(str(data["private_port"])),
            backends=tuple(Backend.from_json(b) for b in backends),
            hairpin_subnets=tuple(str(s) for s in subnets),
            proxy_protocol=data.get("proxy_protocol") is True,
        )
