"""The state directory: round trips, atomic writes, and one lock for every process."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import time
from ipaddress import ip_address
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import pytest

from natports.errors import NatportsError
from natports.model import Backend, Mapping, Protocol, Route, RouteKey
from natports.store import SCHEMA_VERSION, Applied, Store

TCP = Protocol.TCP
UDP = Protocol.UDP

MAPPINGS = (
    Mapping(25, 5025),
    Mapping(53, 5053, UDP, public_ip=ip_address("2001:db8::7")),
    Mapping(1000, 2000, count=11, public_ip=ip_address("203.0.113.7"), process_type="worker"),
)

ROUTES = (
    Route(
        app="mail",
        process_type="web",
        key=RouteKey(4, TCP, 25),
        private_port=5025,
        backends=(
            Backend("c1" * 32, ip_address("172.17.0.2"), 5025),
            Backend("c2" * 32, ip_address("172.17.0.3"), 5025),
        ),
        hairpin_subnets=("172.17.0.0/16",),
    ),
    Route(
        app="mail",
        process_type="web",
        key=RouteKey(6, UDP, 53, ip_address("2001:db8::7")),
        private_port=5053,
        backends=(Backend("c1" * 32, ip_address("fd00::2"), 5053),),
        hairpin_subnets=("fd00::/64",),
    ),
    Route(app="mail", process_type="worker", key=RouteKey(4, TCP, 26), private_port=5026),
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def test_mappings_round_trip(store: Store) -> None:
    assert store.mappings("mail") is None
    store.set_mappings("mail", MAPPINGS)
    assert store.mappings("mail") == MAPPINGS
    assert Store(store.root).mappings("mail") == MAPPINGS


def test_empty_mappings_are_not_missing_mappings(store: Store) -> None:
    store.set_mappings("mail", ())
    assert store.mappings("mail") == ()
    assert store.apps() == ["mail"]


def test_set_mappings_replaces(store: Store) -> None:
    store.set_mappings("mail", MAPPINGS)
    store.set_mappings("mail", (Mapping(587, 5587),))
    assert store.mappings("mail") == (Mapping(587, 5587),)


def test_applied_round_trip(store: Store) -> None:
    assert store.applied("mail") is None
    store.set_applied("mail", Applied("nftables", ROUTES))
    assert store.applied("mail") == Applied("nftables", ROUTES)
    store.set_applied("mail", Applied("nftables", ()))
    assert store.applied("mail") == Applied("nftables", ())


def test_the_file_format(store: Store) -> None:
    store.set_mappings("mail", (Mapping(25, 5025),))
    path = store.root / "apps" / "mail.json"
    assert json.loads(path.read_text()) == {
        "version": SCHEMA_VERSION,
        "app": "mail",
        "mappings": [
            {
                "process_type": "web",
                "protocol": "tcp",
                "public_ip": None,
                "public_port": 25,
                "private_port": 5025,
                "count": 1,
            }
        ],
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_listing_apps(store: Store) -> None:
    assert store.apps() == []
    assert store.applied_apps() == []
    assert store.all_mappings() == {}
    for app in ("relay", "mail", "a-1"):
        store.set_mappings(app, (Mapping(25, 5025),))
    store.set_applied("web", Applied("nftables", ()))
    (store.root / "apps" / "README").write_text("not an app\n")
    assert store.apps() == ["a-1", "mail", "relay"]
    assert store.applied_apps() == ["web"]
    assert store.all_mappings() == {
        "a-1": (Mapping(25, 5025),),
        "mail": (Mapping(25, 5025),),
        "relay": (Mapping(25, 5025),),
    }


def test_removing(store: Store) -> None:
    store.set_mappings("mail", MAPPINGS)
    store.set_applied("mail", Applied("nftables", ROUTES))
    assert store.remove_mappings("mail") is True
    assert store.remove_mappings("mail") is False
    assert store.mappings("mail") is None
    assert store.apps() == []
    assert store.applied_apps() == ["mail"]
    assert store.remove_applied("mail") is True
    assert store.remove_applied("mail") is False
    assert store.applied("mail") is None
    assert store.applied_apps() == []


def test_removing_from_an_empty_store(store: Store) -> None:
    assert store.remove_mappings("nope") is False  # no directories yet
    with store.locked():
        pass
    assert store.remove_mappings("nope") is False
    assert store.remove_applied("nope") is False


def test_writes_leave_no_temporary_files(store: Store) -> None:
    for i in range(5):
        store.set_mappings("mail", (Mapping(25 + i, 5025),))
        store.set_applied("mail", Applied("nftables", ROUTES[: i % 3]))
    assert sorted(p.name for p in (store.root / "apps").iterdir()) == ["mail.json"]
    assert sorted(p.name for p in (store.root / "applied").iterdir()) == ["mail.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.set_mappings("mail", MAPPINGS)
    before = (store.root / "apps" / "mail.json").read_bytes()

    def broken_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    path = store.root / "apps" / "mail.json"
    with pytest.raises(NatportsError) as info:
        store.set_mappings("mail", (Mapping(587, 5587),))
    assert info.value.message == f"cannot write {path}: No space left on device"
    monkeypatch.undo()
    assert (store.root / "apps" / "mail.json").read_bytes() == before
    assert sorted(p.name for p in (store.root / "apps").iterdir()) == ["mail.json"]
    assert store.mappings("mail") == MAPPINGS


def test_a_file_of_another_version(store: Store) -> None:
    store.set_mappings("mail", MAPPINGS)
    path = store.root / "apps" / "mail.json"
    data = json.loads(path.read_text())
    data["version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(NatportsError) as info:
        store.mappings("mail")
    assert info.value.message == f"{path} is not a natports v{SCHEMA_VERSION} state file"


@pytest.mark.parametrize("content", ['{"app": "mail", "mappings": []}', "[1, 2]", '"v1"'])
def test_a_file_without_the_right_version(store: Store, content: str) -> None:
    (store.root / "applied").mkdir(parents=True)
    path = store.root / "applied" / "mail.json"
    path.write_text(content)
    with pytest.raises(NatportsError) as info:
        store.applied("mail")
    assert info.value.message == f"{path} is not a natports v{SCHEMA_VERSION} state file"


def test_a_corrupt_file(store: Store) -> None:
    store.set_mappings("mail", MAPPINGS)
    path = store.root / "apps" / "mail.json"
    path.write_text('{"version": 1, "mappings": [')
    with pytest.raises(NatportsError) as info:
        store.mappings("mail")
    assert info.value.message.startswith(f"cannot read {path}: ")
    assert info.value.hint == "restore or remove the file"
    with pytest.raises(NatportsError):
        store.all_mappings()


@pytest.mark.parametrize(
    ("sub", "content", "error"),
    [
        ("apps", '{"version": 1, "app": "mail"}', "KeyError"),
        ("apps", '{"version": 1, "mappings": {"a": 1}}', "AssertionError"),
        ("apps", '{"version": 1, "mappings": [{"public_port": 25}]}', "KeyError"),
        (
            "apps",
            '{"version": 1, "mappings": [{"public_port": "x", "private_port": 1}]}',
            "ValueError",
        ),
        ("applied", '{"version": 1, "routes": []}', "KeyError"),
        ("applied", '{"version": 1, "backend": "nftables", "routes": "x"}', "AssertionError"),
        ("applied", '{"version": 1, "backend": "nftables", "routes": [{"app": "a"}]}', "KeyError"),
        ("apps", '{"version": 1, "mappings": [1]}', "AttributeError"),
        ("applied", '{"version": 1, "backend": "nftables", "routes": [null]}', "AttributeError"),
    ],
)
def test_a_file_of_the_wrong_shape(store: Store, sub: str, content: str, error: str) -> None:
    (store.root / sub).mkdir(parents=True)
    path = store.root / sub / "mail.json"
    path.write_text(content)
    with pytest.raises(NatportsError) as info:
        store.mappings("mail") if sub == "apps" else store.applied("mail")
    assert info.value.message.startswith(f"{path} is corrupt ({error}: ")
    assert info.value.hint == "restore or remove the file"


def test_an_unusable_state_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = Store(tmp_path / "file" / "state")
    with pytest.raises(NatportsError) as info, store.locked():
        pass
    assert info.value.message.startswith(f"cannot create state directory {store.root}: ")
    assert info.value.hint is not None
    with pytest.raises(NatportsError):
        store.set_mappings("mail", MAPPINGS)
    assert store.apps() == []


def test_locked_creates_the_layout(store: Store) -> None:
    with store.locked():
        assert (store.root / "apps").is_dir()
        assert (store.root / "applied").is_dir()
        assert stat.S_IMODE((store.root / "lock").stat().st_mode) == 0o600


# -- the lock, across processes ---------------------------------------------------------------

WORKERS = 4
ROUNDS = 150


def _count(root: str, rounds: int) -> None:
    store = Store(Path(root))
    counter = Path(root) / "counter"
    for _ in range(rounds):
        with store.locked():
            value = int(counter.read_text())
            os.sched_yield()  # invite the others in: without the lock, updates get lost
            counter.write_text(str(value + 1))


def test_the_lock_serialises_processes(store: Store) -> None:
    store.root.mkdir(parents=True)
    (store.root / "counter").write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count, args=(str(store.root), ROUNDS)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert int((store.root / "counter").read_text()) == WORKERS * ROUNDS


def _write_when_locked(root: str, go: MpEvent) -> None:
    go.wait(30)
    store = Store(Path(root))
    with store.locked():
        (Path(root) / "child").write_text(str(time.monotonic()))


def test_a_second_process_waits_for_the_lock(store: Store) -> None:
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    # Forked before the lock is taken: a child forked later would inherit the parent's
    # descriptor, and with it the flock, and then wait for itself.
    child = ctx.Process(target=_write_when_locked, args=(str(store.root), go))
    child.start()
    try:
        with store.locked():
            go.set()
            time.sleep(0.3)
            assert not (store.root / "child").exists()
            released = time.monotonic()
    finally:
        go.set()
        child.join(timeout=30)
        if child.exitcode is None:
            child.kill()
    assert child.exitcode == 0
    assert float((store.root / "child").read_text()) >= released


def test_the_lock_is_released_when_the_block_raises(store: Store) -> None:
    with pytest.raises(RuntimeError), store.locked():
        raise RuntimeError("boom")
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    go.set()
    child = ctx.Process(target=_write_when_locked, args=(str(store.root), go))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert (store.root / "child").exists()


def test_leftovers_round_trip(store: Store) -> None:
    from natports.store import Leftover

    assert store.leftover("mail") is None
    store.set_leftover("mail", Leftover("proxy", ROUTES))
    assert store.leftover_apps() == ["mail"]
    assert store.leftover("mail") == Leftover("proxy", ROUTES)
    assert store.remove_leftover("mail")
    assert store.leftover_apps() == []


def test_retired_udp_backends_round_trip_and_empty_means_no_file(store: Store) -> None:
    backends = (
        Backend("b" * 64, ip_address("fd00::2"), 53),
        Backend("a" * 64, ip_address("172.17.0.2"), 53),
    )
    store.set_retired_udp(backends)
    assert set(store.retired_udp()) == set(backends)
    assert [b.container_id[0] for b in store.retired_udp()] == ["a", "b"]  # stable order
    store.set_retired_udp(())
    assert store.retired_udp() == ()
    assert not (store.root / "conntrack" / "udp-retired.json").exists()


@pytest.mark.parametrize(
    ("sub", "name", "content"),
    [
        ("leftover", "mail.json", '{"version": 1, "backend": "proxy"}'),
        ("leftover", "mail.json", '{"version": 1, "backend": "proxy", "routes": 3}'),
        ("conntrack", "udp-retired.json", '{"version": 1, "backends": [{"ip": "x"}]}'),
    ],
)
def test_corrupt_typed_records_are_the_stores_error(
    store: Store, sub: str, name: str, content: str
) -> None:
    (store.root / sub).mkdir(parents=True, exist_ok=True)
    (store.root / sub / name).write_text(content)
    with pytest.raises(NatportsError, match="is corrupt"):
        store.leftover("mail") if sub == "leftover" else store.retired_udp()


def test_the_plugins_records_round_trip(store: Store) -> None:
    from natports.sources import Sources, Stage

    sources = Sources((Mapping(25, 5025),), (Mapping(53, 5053, UDP),))
    store.set_sources("mail", sources)
    assert store.sources("mail") == sources
    assert store.sources_apps() == ["mail"]
    stage = Stage("1234:5678:boot", None)
    store.set_stage("mail", stage)
    assert store.stage("mail") == stage
    assert store.remove_stage("mail") and store.stage("mail") is None
    assert store.remove_sources("mail") and store.sources("mail") is None
    (store.root / "dokku").mkdir(exist_ok=True)
    (store.root / "dokku" / "shop.json").write_text('{"version": 1, "ports_map": 7}')
    with pytest.raises(NatportsError, match="is corrupt"):
        store.sources("shop")
