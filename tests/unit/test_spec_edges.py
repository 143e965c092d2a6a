"""Inputs found in review that once crashed the parser or broke the kernel batch."""

from natports.spec import parse_text


def errors(text: str) -> list[str]:
    return [e.format("PORTS") for e in parse_text(text).errors]


def test_a_huge_number_is_out_of_range_not_a_crash() -> None:
    assert errors("1" * 5000 + ":25\n") == [
        "PORTS:1:1: public port 111111111111... is out of range (1-65535)"
    ]


def test_a_zone_index_is_refused() -> None:
    assert errors("[fe80::1%eth0]:25:5025\n") == [
        "PORTS:1:2: fe80::1%eth0: a zone index (%) cannot be a public address"
    ]


def test_an_ipv4_mapped_address_is_refused() -> None:
    assert errors("[::ffff:203.0.113.7]:25:5025\n") == [
        "PORTS:1:2: ::ffff:cb00:7107 is IPv4-mapped: write 203.0.113.7 instead"
    ]
