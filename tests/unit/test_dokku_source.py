"""What the plugin reads from a build's work dir, and how a stage is tied to one build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from natports.build_source import (
    MAX_DOCKERFILE_BYTES,
    BuildSource,
    image_of_dockerfile,
    read_build_source,
)
from natports.dokku import _build_alive, build_key
from natports.errors import InputError
from natports.spec import MAX_PORTS_BYTES

FROM_IMAGE = (
    b"FROM registry.example/mail:1.2\n"
    b'LABEL com.dokku.docker-image-labeler/alternate-tags=[\\"registry.example/mail:1.2\\"]\n'
)


def refused(work: Path) -> str:
    with pytest.raises(InputError) as info:
        read_build_source(work)
    return "\n".join(info.value.problems)


def test_a_regular_ports_file(tmp_path: Path) -> None:
    (tmp_path / "PORTS").write_bytes(b"25:5025\n")
    assert read_build_source(tmp_path) == BuildSource(b"25:5025\n", None)


def test_no_ports_file(tmp_path: Path) -> None:
    assert read_build_source(tmp_path) == BuildSource(None, None)


def test_a_symlink_is_refused_without_reading_its_target(tmp_path: Path) -> None:
    secret = tmp_path / "ENV"
    secret.write_text("DATABASE_URL=postgres://u:hunter2@db/x\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "PORTS").symlink_to(secret)
    message = refused(work)
    assert "symbolic link" in message and "hunter2" not in message


def test_a_dangling_symlink_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "PORTS").symlink_to(tmp_path / "nowhere")
    assert "symbolic link" in refused(tmp_path)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "PORTS")
    assert "not a regular file" in refused(tmp_path)


def test_a_directory_or_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "PORTS").mkdir()
    assert "not a regular file" in refused(tmp_path)
    work = tmp_path / "dev"
    work.mkdir()
    os.symlink("/dev/zero", work / "PORTS")
    assert "symbolic link" in refused(work)


def test_a_file_over_64_kib_is_refused(tmp_path: Path) -> None:
    (tmp_path / "PORTS").write_bytes(b"#" * (MAX_PORTS_BYTES + 1))
    assert f"larger than {MAX_PORTS_BYTES} bytes" in refused(tmp_path)
    (tmp_path / "PORTS").write_bytes(b"#" * MAX_PORTS_BYTES)
    assert read_build_source(tmp_path).ports == b"#" * MAX_PORTS_BYTES


def test_an_image_deploy_is_recognised_from_the_work_dir(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_bytes(FROM_IMAGE)
    assert read_build_source(tmp_path) == BuildSource(None, "registry.example/mail:1.2")


def test_a_ports_file_of_the_build_context_wins_over_the_image(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_bytes(FROM_IMAGE)
    (tmp_path / "PORTS").write_bytes(b"25:5025\n")
    assert read_build_source(tmp_path) == BuildSource(b"25:5025\n", None)


def test_image_of_dockerfile() -> None:
    assert image_of_dockerfile(FROM_IMAGE) == "registry.example/mail:1.2"
    # --build-dir context with its own Dockerfile: Dokku appends its two lines
    assert image_of_dockerfile(b"FROM alpine\nRUN true\n" + FROM_IMAGE + b"\n\n") == (
        "registry.example/mail:1.2"
    )
    assert image_of_dockerfile(b"FROM alpine\nEXPOSE 53/udp\n") is None
    assert image_of_dockerfile(b"FROM $(evil)\n" + FROM_IMAGE.split(b"\n")[1]) is None
    assert image_of_dockerfile(b"") is None


def test_an_odd_dockerfile_only_means_no_image(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").symlink_to("/etc/passwd")
    assert read_build_source(tmp_path) == BuildSource(None, None)
    (tmp_path / "Dockerfile").unlink()
    (tmp_path / "Dockerfile").write_bytes(b"#" * (MAX_DOCKERFILE_BYTES + 1))
    assert read_build_source(tmp_path) == BuildSource(None, None)


def test_build_key_names_a_live_process_and_never_a_recycled_pid() -> None:
    key = build_key(str(os.getpid()))
    boot, pid, started = key.split(":")
    assert pid == str(os.getpid()) and started.isdigit() and boot
    assert build_key(str(os.getpid())) == key
    assert _build_alive(key)
    assert not _build_alive(f"{boot}:{pid}:{int(started) + 1}")  # same pid, other process
    assert not _build_alive("x:1:gone") and not _build_alive("garbage")


@pytest.mark.parametrize("pid", ["", "0", "-1", "12a", "1 2", "99999999999"])
def test_build_key_refuses_what_is_not_a_pid(pid: str) -> None:
    with pytest.raises(InputError):
        build_key(pid)
