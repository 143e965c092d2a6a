"""The DOCKER-USER accept: iptables-restore text from what iptables-save shows."""

from __future__ import annotations

from natports.forwarding import Filter, accept_rule, mode_of, parse, render_ensure, render_remove

ACCEPT = (
    "-A NATPORTS-FWD -m conntrack --ctstate DNAT -m connmark --mark 0x100000/0x100000 "
    '-m comment --comment "natports: flows natports DNATed" -j ACCEPT'
)

DOCKER_ONLY = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""

INSTALLED = f"""\
*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:NATPORTS-FWD - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j NATPORTS-FWD
-A DOCKER-USER -j RETURN
{ACCEPT}
COMMIT
"""


def test_the_accept_rule_is_written_as_iptables_save_prints_it() -> None:
    assert accept_rule("NATPORTS") == ACCEPT


def test_first_install_adds_the_chain_and_one_jump_first_in_docker_user() -> None:
    live = parse(DOCKER_ONLY, "NATPORTS")
    assert live == Filter(has_user_chain=True, jumps=0, ours=(), has_chain=False)
    assert mode_of(live, "NATPORTS") == "publish"
    assert render_ensure(live, "NATPORTS") == (
        f"*filter\n:NATPORTS-FWD - [0:0]\n{ACCEPT}\n-I DOCKER-USER 1 -j NATPORTS-FWD\nCOMMIT\n"
    )


def test_an_exact_install_renders_nothing() -> None:
    live = parse(INSTALLED, "NATPORTS")
    assert mode_of(live, "NATPORTS") == "docker-user"
    assert render_ensure(live, "NATPORTS") == ""


def test_extra_jumps_and_a_changed_rule_are_repaired() -> None:
    text = INSTALLED.replace(
        "-A DOCKER-USER -j RETURN", "-A DOCKER-USER -j NATPORTS-FWD\n-A DOCKER-USER -j RETURN"
    ).replace(ACCEPT, "-A NATPORTS-FWD -j ACCEPT")
    live = parse(text, "NATPORTS")
    assert live.jumps == 2
    assert mode_of(live, "NATPORTS") == "publish"
    assert render_ensure(live, "NATPORTS") == (
        f"*filter\n:NATPORTS-FWD - [0:0]\n{ACCEPT}\n-D DOCKER-USER -j NATPORTS-FWD\nCOMMIT\n"
    )


def test_without_docker_user_nothing_is_installed() -> None:
    live = parse("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", "NATPORTS")
    assert render_ensure(live, "NATPORTS") == ""
    assert mode_of(live, "NATPORTS") == "publish"


def test_remove_deletes_the_jump_then_the_chain_and_only_ours() -> None:
    other = INSTALLED.replace("NATPORTS-FWD", "NATPORTS_TEST-FWD")
    assert render_remove(parse(other, "NATPORTS"), "NATPORTS") == ""
    assert render_remove(parse(INSTALLED, "NATPORTS"), "NATPORTS") == (
        "*filter\n:NATPORTS-FWD - [0:0]\n-D DOCKER-USER -j NATPORTS-FWD\n-X NATPORTS-FWD\nCOMMIT\n"
    )
