"""Where a build's PORTS comes from: the work dir, or the image an image deploy runs.

Every path refuses a PORTS that is not a regular file of at most 64 KiB without reading
it: the dokku user could point it at another app's secrets (a symlink to its ENV).
The work dir is read by an unprivileged command (`natports dokku read-source`, run as
the dokku user); an image's PORTS comes out of a created, never started, container.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .context import Context
from .errors import InputError, NatportsError
from .spec import MAX_PORTS_BYTES, excerpt

_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
# git:from-image writes `FROM IMAGE` and this label as the last lines of the work dir's
# Dockerfile (Dokku v0.38.27 plugins/git/git-from-image:25-26); ps:rebuild checks the
# same commit out again, so the work dir tells an image deploy on every path.
_IMAGE_LABEL = "LABEL com.dokku.docker-image-labeler/alternate-tags="
MAX_DOCKERFILE_BYTES = 1024 * 1024


def read_ports_from_image(ctx: Context, image: str) -> bytes | None:
    """The PORTS file inside an image (its working directory, /app, then /), if any."""
    if not _IMAGE_RE.fullmatch(image):
        raise InputError([f'"{excerpt(image)}" is not an image reference'])
    client = ctx.docker().client
    try:
        return _ports_from_image(client, image)
    except (NatportsError, InputError):  # a refused PORTS stays a refusal
        raise
    except Exception as exc:  # the SDK and requests raise many kinds
        raise NatportsError(f"cannot read PORTS from image {image}: {exc}") from None


def _ports_from_image(client: Any, image: str) -> bytes | None:
    import tarfile  # here, not at the top: only image deploys read an archive (and bz2, lzma)

    workdir = (client.api.inspect_image(image).get("Config") or {}).get("WorkingDir") or "/"
    created = client.api.create_container(image, command=["/PORTS"], entrypoint=[])
    try:
        for folder in dict.fromkeys([workdir, "/app", "/"]):
            path = str(PurePosixPath(folder) / "PORTS")
            try:
                stream, _ = client.api.get_archive(created["Id"], path)
            except Exception:  # any failure here means "not there"
                continue
            with tarfile.open(fileobj=io.BytesIO(_capped(stream))) as tar:
                member = tar.next()
                if member is None:
                    continue
                if not member.isfile():  # a symlink or a device: refused unread
                    raise InputError([f"{path} in the image is not a regular file"])
                if member.size > MAX_PORTS_BYTES:
                    raise InputError(
                        [f"{path} in the image is larger than {MAX_PORTS_BYTES} bytes"]
                    )
                handle = tar.extractfile(member)
                if handle is not None:
                    return handle.read(MAX_PORTS_BYTES + 1)
        return None
    finally:
        client.api.remove_container(created["Id"], force=True)


def _capped(stream: Any) -> bytes:
    """An archive stream, refused past what a tar of one capped PORTS file can be."""
    limit = MAX_PORTS_BYTES + 64 * 1024
    data = bytearray()
    for chunk in stream:
        data += chunk
        if len(data) > limit:
            raise InputError([f"PORTS in the image is larger than {MAX_PORTS_BYTES} bytes"])
    return bytes(data)


@dataclass(frozen=True)
class BuildSource:
    """What a build's work dir says about PORTS: its content, or the image it deploys."""

    ports: bytes | None
    image: str | None


def read_build_source(work_dir: Path) -> BuildSource:
    """The work dir's PORTS, refused unread unless a regular file of at most 64 KiB.

    A symlink (to another app's ENV, say), a FIFO or a device is never opened for
    reading: O_NOFOLLOW refuses the link itself, O_NONBLOCK keeps a FIFO from blocking,
    and fstat decides before any byte is read. Dokku has already moved a configured
    build-dir to the top of the work dir (builder core-post-extract, Dokku v0.38.27
    plugins/builder/triggers.go:69-101), so WORK_DIR/PORTS is the right file either way.
    """
    try:
        dir_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise InputError([f"cannot open the build's work dir: {exc.strerror}"]) from None
    try:
        ports = _read_regular(dir_fd, "PORTS", MAX_PORTS_BYTES)
        image = None
        if ports is None:
            dockerfile = _read_regular(dir_fd, "Dockerfile", MAX_DOCKERFILE_BYTES, strict=False)
            image = None if dockerfile is None else image_of_dockerfile(dockerfile)
        return BuildSource(ports, image)
    finally:
        os.close(dir_fd)


def _read_regular(dir_fd: int, name: str, limit: int, strict: bool = True) -> bytes | None:
    """NAME in the directory if it is a regular file within `limit`; None when absent.

    strict: anything else is an error (PORTS); otherwise it counts as absent (Dockerfile).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not strict:
            return None
        if exc.errno == errno.ELOOP:
            raise InputError(
                [f"{name} is a symbolic link: natports reads only a regular file"]
            ) from None
        raise InputError([f"{name}: cannot open: {exc.strerror}"]) from None
    try:
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = f"{name} is not a regular file (a FIFO, device or directory)"
        elif info.st_size > limit:
            problem = f"{name} is larger than {limit} bytes"
        if problem:
            if strict:
                raise InputError([problem])
            return None
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            if strict:
                raise InputError([f"{name} is larger than {limit} bytes"])
            return None
        return data
    finally:
        os.close(fd)


def image_of_dockerfile(dockerfile: bytes) -> str | None:
    """The image of a git:from-image deploy, from the two lines Dokku appended."""
    lines = [ln.strip() for ln in dockerfile.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if (
        len(lines) < 2
        or not lines[-2].startswith("FROM ")
        or not lines[-1].startswith(_IMAGE_LABEL)
    ):
        return None
    image = lines[-2].removeprefix("FROM ").strip()
    return image if _IMAGE_RE.fullmatch(image) else None
